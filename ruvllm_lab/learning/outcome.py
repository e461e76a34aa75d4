"""What counts as success in serving: the one place that turns evidence about an answer into a label.

The router learns "was tier t adequate for this request?" (``router.model``).  The evidence for
one answer is a mapping of signals (``Interaction.signals[tier]``); the first rule that applies
decides, in this order of trust:

==============  =====================================================  ==========================
signal          rule                                                   weight
==============  =====================================================  ==========================
``gold``        the judge's gold signal is 1.0 (``judge.gold_match``    1
                matched; the strict matcher of ``workloads.is_correct``
                semantics) -> adequate, otherwise inadequate
``correction``  the user corrected the answer -> inadequate            1
``rating``      >= ``learning.rating_success_min`` (4) adequate;        1
                <= ``learning.rating_failure_max`` (2) inadequate;
                in between (3) neutral: no label at all
``score``       a bare judged score in [0, 1] (durable label logs,     1
                offline data, ``add_score``) read on the rating scale,
                rating r <-> (r - 1) / 4 (``judge.feedback_signal``):
                >= 0.75 adequate, <= 0.25 inadequate, between neutral
``agreement``   shadow evaluation: a neighbouring tier's answer agrees  ``learning.shadow_weight``
                (or not) with an answer that was itself rated adequate
``logprob``     geometric-mean token probability below                 ``learning.logprob_weight``
                ``learning.logprob_failure_below`` -> inadequate; at or
                above ``learning.logprob_success_at`` -> adequate;
                between -> no label
==============  =====================================================  ==========================

A neutral rating (or score) stops the search: someone looked at the answer and found it middling,
so the weaker log-prob signal must not overrule that with a label.

Why log-prob only for failure by default: in ``experiments/judge_calibration.py``
(``experiments/results/judge_calibration.json``, smollm2-135m, 40 generated questions, 30 %
correct) no answer with geometric-mean token probability below 0.45 was correct (6 answers),
while no threshold reached 80 % precision for *correct* with at least 5 answers above it (AUROC
0.693).  So a low log-prob is weak evidence of failure and a high one is no evidence of success;
``learning.logprob_success_at = 1.0`` keeps the success side off.  The LLM-as-judge grade is
not used: at these model sizes it grades at chance (same calibration, AUROC 0.43-0.54).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..config import LearningConfig

SOURCES = ("gold", "correction", "rating", "score", "agreement", "logprob")


@dataclass(frozen=True)
class Outcome:
    """Was the answer adequate; how much to trust that; which rule said so."""
    adequate: bool
    weight: float
    source: str


def outcome_of(signals: Mapping[str, Any] | None, lc: LearningConfig) -> Outcome | None:
    """The label of one answer from its evidence (module docstring); None = no label.

    ``signals`` keys (all optional): ``gold`` (judge gold score in [0, 1], 1.0 = matched),
    ``correction`` (truthy = the user corrected it), ``rating`` (int 1..5), ``agreement``
    (bool, shadow evaluation), ``logprob`` (geometric-mean token probability), ``score``
    (a judged score in [0, 1]).
    """
    if not signals:
        return None
    gold = signals.get("gold")
    if gold is not None:
        return Outcome(float(gold) >= 1.0, 1.0, "gold")
    if signals.get("correction"):
        return Outcome(False, 1.0, "correction")
    rating = signals.get("rating")
    if rating is not None:
        rating = int(rating)
        if rating >= lc.rating_success_min:
            return Outcome(True, 1.0, "rating")
        if rating <= lc.rating_failure_max:
            return Outcome(False, 1.0, "rating")
        return None  # neutral: no label, and no weaker signal overrules the user
    score = signals.get("score")
    if score is not None:  # read on the rating scale, where rating r is the score (r - 1) / 4
        if float(score) >= (lc.rating_success_min - 1) / 4.0:
            return Outcome(True, 1.0, "score")
        if float(score) <= (lc.rating_failure_max - 1) / 4.0:
            return Outcome(False, 1.0, "score")
        return None
    agreement = signals.get("agreement")
    if agreement is not None:
        return Outcome(bool(agreement), lc.shadow_weight, "agreement")
    logprob = signals.get("logprob")
    if logprob is not None and lc.logprob_weight > 0:
        if float(logprob) < lc.logprob_failure_below:
            return Outcome(False, lc.logprob_weight, "logprob")
        if float(logprob) >= lc.logprob_success_at:
            return Outcome(True, lc.logprob_weight, "logprob")
        return None
    return None
