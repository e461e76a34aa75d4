"""Quality judge: one score in [0, 1] for an answer, from whichever signals are known.

Four signals, each in [0, 1] (``None`` when the signal is not available for this answer):

* ``gold``     -- the answer against a known gold answer (:func:`gold_match`): 1.0 on an exact,
  normalised (SQuAD-style: case, punctuation, articles, whitespace), numeric (within a
  tolerance) or containment match, otherwise the token-overlap F1 as partial credit;
* ``feedback`` -- explicit user feedback (:func:`feedback_signal`): rating r in 1..5 maps to
  (r - 1) / 4; a correction means the answer was wrong and gives 0.0;
* ``llm``      -- LLM-as-judge (:class:`LLMJudge`): a configured tier reads a fixed rubric and
  answers with a digit 1..5, mapped to (s - 1) / 4;
* ``logprob``  -- confidence from the answer's own token log-probs (:func:`logprob_confidence`):
  the geometric-mean token probability exp(mean(logprob)).

The combined score is the weighted mean over the signals present::

    score = sum_s w_s * v_s / sum_s w_s      (s over present signals with w_s > 0)

with ``w = learning.judge_weights``.  With no signal present the score is ``None``: the judge
does not invent a prior.  :func:`calibration_table` reports how well the cheap proxies
(``llm``, ``logprob``) agree with ``gold`` on a labelled set.
"""
from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..config import LearningConfig
from ..workloads import answer_matches, is_number_gold

SIGNALS = ("gold", "feedback", "llm", "logprob")

# ---------------------------------------------------------------------------------------
# (a) gold answer
# ---------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
# A number: optional sign, digits with optional thousands commas, optional decimals / exponent.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, punctuation -> space, drop a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def extract_numbers(text: str) -> list[float]:
    """Every number in `text`, in order ("1,000" -> 1000.0, "-2.5e3" -> -2500.0)."""
    out = []
    for m in _NUMBER.finditer(text):
        try:
            out.append(float(m.group().replace(",", "")))
        except ValueError:  # pragma: no cover - the regex only matches parseable numbers
            continue
    return out


def token_f1(answer: str, gold: str) -> float:
    """SQuAD token-overlap F1 between the normalised texts (multiset overlap)."""
    a, g = normalize_answer(answer).split(), normalize_answer(gold).split()
    if not a or not g:
        return float(a == g)
    common: dict[str, int] = {}
    for tok in g:
        common[tok] = common.get(tok, 0) + 1
    overlap = 0
    for tok in a:
        if common.get(tok, 0) > 0:
            overlap += 1
            common[tok] -= 1
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(a), overlap / len(g)
    return 2 * precision * recall / (precision + recall)


@dataclass
class GoldMatch:
    exact: bool  # byte-identical after strip()
    normalised: bool  # identical after normalize_answer
    numeric: bool  # gold is one number; the answer states it and no other candidate (workloads.answer_matches)
    contains: bool  # gold is text; the answer's first line states it and no alternative (workloads.answer_matches)
    f1: float  # token-overlap F1 (partial credit)

    @property
    def matched(self) -> bool:
        return self.exact or self.normalised or self.numeric or self.contains

    @property
    def score(self) -> float:
        """1.0 on any match, otherwise the token F1."""
        return 1.0 if self.matched else self.f1


def numbers_close(a: float, b: float, rel_tol: float = 1e-3, abs_tol: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


def gold_match(answer: str, gold: str, rel_tol: float = 1e-3, abs_tol: float = 1e-6) -> GoldMatch:
    """Compare an answer with a gold answer.

    ``numeric`` (a gold that is one number) and ``contains`` (any other gold) are the strict
    matcher every experiment uses, ``workloads.answer_matches``: only the first line (or an
    explicit final "Answer:" line) counts, numbers compare as numbers within
    ``rel_tol``/``abs_tol``, and an answer offering several candidates ("40 or 45 or 50", all
    seven weekdays, an unevaluated "1 * 7") is wrong.  Whole words only, so the gold "art" is
    not found in "start".
    """
    if not isinstance(answer, str) or not isinstance(gold, str):
        raise TypeError("gold_match expects two strings")
    na, ng = normalize_answer(answer), normalize_answer(gold)
    strict = answer_matches(answer, gold, match="auto", rel_tol=rel_tol, abs_tol=abs_tol)
    numeric, contains = (strict, False) if is_number_gold(gold) else (False, strict)
    return GoldMatch(exact=answer.strip() == gold.strip(), normalised=bool(ng) and na == ng,
                     numeric=numeric, contains=contains, f1=token_f1(answer, gold))


# ---------------------------------------------------------------------------------------
# (b) explicit feedback
# ---------------------------------------------------------------------------------------
def feedback_signal(feedback: Any) -> float | None:
    """Map feedback to [0, 1]: rating r (1..5) -> (r - 1) / 4; any correction -> 0.0.

    Accepts a :class:`ruvllm_lab.types.Feedback`, a mapping with ``rating``/``correction``,
    or a bare integer rating.  A correction wins over a rating: the user said the answer was
    wrong.  Returns ``None`` when the feedback carries neither.
    """
    if feedback is None:
        return None
    if isinstance(feedback, Mapping):
        rating, correction = feedback.get("rating"), feedback.get("correction")
    elif isinstance(feedback, (int, np.integer)) and not isinstance(feedback, bool):
        rating, correction = int(feedback), None
    else:
        rating, correction = getattr(feedback, "rating", None), getattr(feedback, "correction", None)
    if correction is not None and str(correction).strip():
        return 0.0
    if rating is None:
        return None
    if isinstance(rating, bool) or not isinstance(rating, (int, np.integer)) or not 1 <= rating <= 5:
        raise ValueError(f"rating must be an integer from 1 to 5, got {rating!r}")
    return (int(rating) - 1) / 4.0


# ---------------------------------------------------------------------------------------
# (d) log-prob confidence
# ---------------------------------------------------------------------------------------
@dataclass
class Confidence:
    mean_prob: float  # arithmetic mean of per-token probabilities
    geometric_mean_prob: float  # exp(mean logprob) = 1 / perplexity of the answer
    min_prob: float
    n_tokens: int


def logprob_confidence(logprobs: Sequence[float] | np.ndarray) -> Confidence:
    """Confidence statistics of a generated answer from its per-token natural-log probs."""
    lp = np.asarray(list(logprobs), dtype=np.float64)
    if lp.size == 0:
        raise ValueError("logprob_confidence needs at least one token log-prob")
    if not np.all(np.isfinite(lp)) or np.any(lp > 1e-6):
        raise ValueError("log-probs must be finite and <= 0")
    lp = np.minimum(lp, 0.0)
    probs = np.exp(lp)
    return Confidence(mean_prob=float(probs.mean()), geometric_mean_prob=float(math.exp(lp.mean())),
                      min_prob=float(probs.min()), n_tokens=int(lp.size))


# ---------------------------------------------------------------------------------------
# (c) LLM-as-judge
# ---------------------------------------------------------------------------------------
JUDGE_RUBRIC = (
    "Grade the answer to the question.\n"
    "5 = correct and complete, 4 = correct with small omissions, 3 = partly correct, "
    "2 = mostly wrong, 1 = wrong or off-topic.\n"
    "{gold_line}"
    "Question: {query}\n"
    "Answer: {answer}\n"
    "On a scale of 1 to 5, how correct is this answer? Rating:"
)
_DIGIT = re.compile(r"(?<![\d.])[1-5](?![\d])")  # a lone 1..5, not part of "12" or "0.5"
_NEGATIVE = re.compile(r"\b(incorrect|not correct|wrong|false|inaccurate)\b", re.IGNORECASE)
_POSITIVE = re.compile(r"\b(correct|right|true|accurate)\b", re.IGNORECASE)


def parse_judge_score(text: str) -> int | None:
    """The judge's grade 1..5, or None when the reply holds none.

    The first lone digit 1..5 wins ("Rating: 4" -> 4, "4/5" -> 4, but not "18 legs"); failing
    that, a verdict word: "incorrect"/"wrong" -> 1, "correct"/"right" -> 5 (small models often
    answer in words).  Negations are checked first so "not correct" is not read as correct.
    """
    text = text or ""
    m = _DIGIT.search(text)
    if m:
        return int(m.group())
    if _NEGATIVE.search(text):
        return 1
    if _POSITIVE.search(text):
        return 5
    return None


@dataclass
class LLMJudge:
    """Ask a tier of the inference pool to grade an answer with :data:`JUDGE_RUBRIC`.

    The reply is decoded greedily (temperature 0) and parsed by :func:`parse_judge_score`;
    an unparseable reply gives no signal (``None``) rather than a guess.
    """

    pool: Any
    tier: str
    max_tokens: int = 12

    def prompt(self, query: str, answer: str, gold: str | None = None) -> list[dict]:
        gold_line = f"Reference answer: {gold}\n" if gold else ""
        return [{"role": "user", "content": JUDGE_RUBRIC.format(query=query, answer=answer, gold_line=gold_line)}]

    def judge(self, query: str, answer: str, gold: str | None = None) -> tuple[float | None, str]:
        """(score in [0, 1] or None, raw reply)."""
        gen = self.pool.generate(self.tier, self.prompt(query, answer, gold), max_tokens=self.max_tokens,
                                 temperature=0.0)
        digit = parse_judge_score(gen.text)
        return (None if digit is None else (digit - 1) / 4.0), gen.text


# ---------------------------------------------------------------------------------------
# combination
# ---------------------------------------------------------------------------------------
@dataclass
class JudgeResult:
    score: float | None  # weighted mean of the present signals; None when none is present
    signals: dict[str, float] = field(default_factory=dict)  # signal name -> value in [0, 1]
    details: dict[str, Any] = field(default_factory=dict)  # raw evidence (match flags, judge reply, ...)

    @property
    def known(self) -> bool:
        return self.score is not None


def combine_signals(signals: Mapping[str, float | None], weights: Mapping[str, float]) -> float | None:
    """sum_s w_s v_s / sum_s w_s over present signals with w_s > 0; None if there are none."""
    num = den = 0.0
    for name, value in signals.items():
        w = float(weights.get(name, 0.0))
        if value is None or w <= 0.0:
            continue
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"signal {name} = {value!r} is outside [0, 1]")
        num += w * value
        den += w
    return num / den if den > 0 else None


class QualityJudge:
    """Scores answers from the signals ``LearningConfig`` enables.

    The LLM signal is computed only when ``config.judge_tier`` is set and a pool is given
    (it costs a generation); the gold, feedback and log-prob signals are free.
    """

    def __init__(self, config: LearningConfig, pool: Any = None):
        self.config = config
        self.weights = {k: float(config.judge_weights.get(k, 0.0)) for k in SIGNALS}
        self.llm = LLMJudge(pool, config.judge_tier) if (pool is not None and config.judge_tier) else None

    def score(self, query: str, answer: str, gold: str | None = None, feedback: Any = None,
              logprobs: Sequence[float] | None = None) -> JudgeResult:
        signals: dict[str, float] = {}
        details: dict[str, Any] = {}
        if gold is not None and self.weights["gold"] > 0:
            m = gold_match(answer, gold)
            signals["gold"] = m.score
            details["gold"] = m
        fb = feedback_signal(feedback) if self.weights["feedback"] > 0 else None
        if fb is not None:
            signals["feedback"] = fb
        if self.llm is not None and self.weights["llm"] > 0:
            value, reply = self.llm.judge(query, answer, gold=None)
            details["llm_reply"] = reply
            if value is not None:
                signals["llm"] = value
        if logprobs is not None and len(logprobs) > 0 and self.weights["logprob"] > 0:
            conf = logprob_confidence(logprobs)
            signals["logprob"] = conf.geometric_mean_prob
            details["logprob"] = conf
        return JudgeResult(score=combine_signals(signals, self.weights), signals=signals, details=details)


# ---------------------------------------------------------------------------------------
# calibration of the cheap signals against gold
# ---------------------------------------------------------------------------------------
def auroc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic (ties count 1/2); nan if one class."""
    from scipy.stats import rankdata

    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def calibration_table(labelled: Iterable[Any], signals: Sequence[str] = ("llm", "logprob"),
                      threshold: float = 0.5, gold_threshold: float = 1.0) -> list[dict[str, Any]]:
    """How well each proxy signal predicts gold correctness on a labelled set.

    ``labelled``: :class:`JudgeResult` objects or ``{signal: value}`` mappings that include
    ``gold``.  An item is *correct* when ``gold >= gold_threshold`` (default: a full match).
    One row per proxy signal with

    * ``n`` (items where both the proxy and gold are present), ``positive_rate``,
    * ``auroc`` -- P(proxy ranks a correct answer above a wrong one),
    * ``accuracy`` -- of the rule ``proxy >= threshold`` predicting correct,
    * ``pearson`` -- correlation of the proxy with the (graded) gold score,
    * ``brier`` -- mean (proxy - correct)^2, treating the proxy as a probability.

    Undefined entries (one class only, constant values) are ``nan``.
    """
    rows_in = [r.signals if isinstance(r, JudgeResult) else dict(r) for r in labelled]
    table = []
    for name in signals:
        pairs = [(float(r["gold"]), float(r[name])) for r in rows_in
                 if r.get("gold") is not None and r.get(name) is not None]
        gold = np.array([p[0] for p in pairs])
        proxy = np.array([p[1] for p in pairs])
        correct = gold >= gold_threshold
        row: dict[str, Any] = {"signal": name, "n": len(pairs)}
        if pairs:
            row["positive_rate"] = float(correct.mean())
            row["auroc"] = auroc(correct, proxy)
            row["accuracy"] = float(((proxy >= threshold) == correct).mean())
            row["pearson"] = (float(np.corrcoef(proxy, gold)[0, 1])
                              if proxy.std() > 0 and gold.std() > 0 else float("nan"))
            row["brier"] = float(((proxy - correct) ** 2).mean())
        else:
            row.update(positive_rate=float("nan"), auroc=float("nan"), accuracy=float("nan"),
                       pearson=float("nan"), brier=float("nan"))
        table.append(row)
    return table


def calibration_markdown(table: Sequence[Mapping[str, Any]]) -> str:
    """Render :func:`calibration_table` as a markdown table."""
    cols = ["signal", "n", "positive_rate", "auroc", "accuracy", "pearson", "brier"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table:
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
