"""LearningService: turns logged interactions into router training, memory reinforcement and
attention training, without ever blocking a query.

Serving (``route``)
-------------------
The serving router decides (``router.base``); with probability ``learning.explore_rate`` a
learned router's pick is replaced by a cheaper tier -- the next cheaper one, or with
``learning.explore_tiers = "cheaper"`` one of the k cheaper tiers uniformly -- to find where a
cheaper tier is enough (the only way a bandit learner sees a cheaper tier's outcome).  Every
decision carries ``propensity``, the probability with which its tier was chosen (1 - rate for
the policy's own pick, rate (or rate / k) for an explored one, 1 when nothing cheaper exists or
the tier was forced).

Cycle (``learn()``; ``start()`` runs it every ``learning.training_interval_ms`` in a daemon thread)
--------------------------------------------------------------------------------------------------
(or sooner, once ``learning.max_pending`` interactions wait: ``wait_for_cycle``)

1. Drain the interactions recorded since the last cycle.  Each tier's evidence
   (``Interaction.signals``: gold, rating, correction, log-prob, ...) becomes an outcome by the
   one rule in :mod:`ruvllm_lab.learning.outcome`; an interaction with at least one outcome
   becomes a censored :class:`RouterExample` (``outcomes`` = only the tiers actually tried --
   never a label for an untried tier).  Shadow evaluation adds full-information rows (below).
2. Memory: the nodes an answer used are reinforced with reward ``2 * score - 1`` (the chosen
   tier's judged score mapped to [-1, 1]), then edges decay once.  Attention trains on a *copy*
   of the serving ranker (one step per well-judged answer, the nodes it used as positives) that
   replaces the serving one by a single reference swap -- like the router.
3. Router: once ``learning.min_examples`` fresh examples are waiting, a copy of the serving
   router trains through the one :class:`~ruvllm_lab.learning.trainer.ContinualTrainer` (replay
   mix at ``learning.replay_ratio``, online EWC with the label log-likelihood's Fisher, IHT to
   ``router.sparsity``, Adam moments carried across cycles) and then consolidates on the fresh
   examples, which join the replay reservoir.
4. Swap: only when every step's loss and every weight is finite does the trained copy become the
   serving router (one reference assignment under a lock); otherwise the error is logged and
   reported, the old router keeps serving, and that cycle's fresh examples are dropped so one
   poisoned example cannot fail every later cycle.
5. Off-policy report: from the last ``learning.offpolicy_window`` logged, labelled decisions,
   inverse-propensity / self-normalised / doubly robust estimates of the quality and cost of (a)
   the policy that logged them without exploration and (b) the router now serving
   (:mod:`ruvllm_lab.learning.offpolicy`), under ``report["offpolicy"]``.
6. Router weights, trainer state (EWC, optimiser), replay buffer and attention weights are saved
   in ``system.data_dir`` under the names in ``STATE_FILES`` -- all loadable with
   ``torch.load(weights_only=True)``: no pickle anywhere in learned state.

Shadow evaluation (``start_shadow``; ``learning.shadow_rate``)
-------------------------------------------------------------
A judged interaction is queued with probability ``shadow_rate`` as soon as its outcome is known
(recorded with one, or when feedback arrives).  When no request is in flight,
a background thread re-answers a queued query with a neighbouring tier -- the next cheaper one
when the served answer was adequate, the next larger one when it was not -- and judges it: by
gold when the request had one; otherwise a cheaper tier's answer is adequate when it agrees with
the adequate answer (``agreement``, weight ``learning.shadow_weight``), and a larger tier's by
its log-prob (weak).  Both outcomes on the same input make a full-information row.  Only tiers
already loaded are used (a model load cannot be interrupted) and generation stops at the next
token when a request arrives (``busy()``), so a user query is never blocked behind it.

Routers that are not torch modules (knn, logreg, ...) are updated by ``partial_fit`` on a copy;
they use only rows that pin the cheapest adequate tier down (``RouterExample.exact_tier``).

``updates`` counts optimiser steps on the serving router since creation -- the unit of the
forgetting metrics (``learning.metrics``).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..config import STATE_FILES, Config
from ..errors import RequestNotFound
from ..router.base import RouterExample, RouterInput, RoutingDecision
from .ewc import EWCState
from .judge import feedback_signal, gold_match
from .offpolicy import LoggedDecision, off_policy_estimate
from .outcome import Outcome, outcome_of
from .replay import ReplayBuffer
from .trainer import ContinualTrainer

log = logging.getLogger(__name__)

STOP_POLL_S = 0.2  # how soon a waiting background learner notices stop()
TRAINER_STATE_FILE = "trainer_state.pt"  # optimiser moments + update count, beside STATE_FILES

# (tier, query, max_tokens, should_stop) -> (text, logprobs) or None when stopped early
Answerer = Callable[[str, str, int, Callable[[], bool]], "tuple[str, list[float] | None] | None"]


@dataclass
class Interaction:
    """One answered request, as the learning loops see it."""

    request_id: str
    x: RouterInput  # what the router saw
    decision: RoutingDecision | None = None  # what it chose (None for forced/offline logs)
    tier_scores: dict[str, float] = field(default_factory=dict)  # judged quality per tier tried, in [0, 1]
    latency_ms: float | None = None
    cost: float | None = None  # relative cost of the tier(s) used
    node_ids: list[int] = field(default_factory=list)  # memory nodes given to the model as context
    state: Any = None  # the router hidden state this turn was routed with
    subgraph: Any = None  # the ranked ruvllm_lab.graph.Subgraph, when the caller kept it
    timestamp: float = field(default_factory=time.time)
    # per tier tried: the evidence outcome.outcome_of reads (gold, rating, correction, logprob, score)
    signals: dict[str, dict[str, Any]] = field(default_factory=dict)
    query: str | None = None  # kept only while shadow evaluation may re-answer it
    answer: str | None = None
    gold: str | None = None

    @property
    def chosen_tier(self) -> str | None:
        if self.decision is not None:
            return self.decision.tier
        return self.x.forced_tier

    @property
    def chosen_score(self) -> float | None:
        tier = self.chosen_tier
        if tier is not None and tier in self.tier_scores:
            return self.tier_scores[tier]
        return max(self.tier_scores.values()) if self.tier_scores else None


def outcomes_of(inter: Interaction, tiers: Sequence[str], lc) -> dict[str, Outcome]:
    """Outcome per tier tried: from its signals, else from its bare judged score (``outcome``)."""
    out: dict[str, Outcome] = {}
    for t in tiers:
        sig = dict(inter.signals.get(t) or {})
        if t in inter.tier_scores and inter.tier_scores[t] is not None and not sig:
            sig = {"score": inter.tier_scores[t]}
        o = outcome_of(sig, lc)
        if o is not None:
            out[t] = o
    return out


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()), "")


_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def _key_terms(line: str, query: str) -> set[str]:
    """What an answer asserts beyond the question: its numbers and its capitalised, non-initial
    words (names), less those the question already contains; lower-cased."""
    asked = {w.lower() for w in _WORD.findall(query)} | set(_NUMBER.findall(query))
    names = [w for i, w in enumerate(_WORD.findall(line)) if i > 0 and w[0].isupper()]
    return {t.lower() for t in names + _NUMBER.findall(line)} - asked


def answers_agree(candidate: str, reference: str, query: str = "") -> bool:
    """The candidate answer says what the (adequate) reference answer says.

    First lines only.  Either matches the other as a gold answer (``judge.gold_match``:
    normalised, numeric or whole-word containment, so "Canberra" agrees with "The capital of
    Australia is Canberra."), or the candidate names every key term of the reference -- its numbers
    and names not already in the question -- so "Homer wrote it." agrees with "The Odyssey was
    written by Homer." for "Who wrote the Odyssey?", and "To add 30 and 85 ..." does not agree
    with "115"."""
    a, b = _first_line(candidate), _first_line(reference)
    if not (a and b):
        return False
    if gold_match(a, b).matched or gold_match(b, a).matched:
        return True
    terms = _key_terms(b, query)
    said = {w.lower() for w in _WORD.findall(a)} | set(_NUMBER.findall(a))
    return bool(terms) and terms <= said


class LearningService:
    """See the module docstring.  ``router`` is the serving router; read it per request.

    ``persist=False`` keeps everything in memory (experiments feeding outcomes through
    :meth:`observe`); ``resume`` loads saved state from ``system.data_dir`` at start."""

    def __init__(self, config: Config, router: Any, memory: Any = None, attention: Any = None,
                 judge: Any = None, resume: bool = True, persist: bool = True):
        self.config = config
        self.lc = config.learning
        self.memory = memory
        self.attention = attention
        self.judge = judge
        self.persist = persist
        self._router = router
        self.tiers: list[str] = list(router.tiers)
        self.trainer = ContinualTrainer.from_config(config)
        self.cycles = 0
        self.swaps = 0
        self.last_report: dict[str, Any] = {}
        self._pending: list[Interaction] = []
        self._waiting: list[RouterExample] = []  # labelled, not yet trained on (fewer than min_examples)
        self._recent: OrderedDict[str, Interaction] = OrderedDict()
        self._logged: OrderedDict[str, tuple] = OrderedDict()  # request id -> (x, state, decision, reward, cost)
        self._tier_quality: dict[str, float] = {}  # exponential moving average of judged scores
        self._rng = np.random.default_rng(config.system.seed)
        self._lock = threading.Lock()  # pending / recent / tier quality / rng / shadow queue
        self._swap_lock = threading.Lock()  # the serving-router reference, attention adopt()
        self._train_lock = threading.Lock()  # one cycle at a time
        self._stop = threading.Event()
        self._backlog = threading.Event()  # set when learning.max_pending interactions wait: learn now
        self._thread: threading.Thread | None = None
        self._shadow_jobs: deque[Interaction] = deque(maxlen=self.lc.shadow_queue)
        self._shadow_rows: list[RouterExample] = []
        self._shadowed: OrderedDict[str, None] = OrderedDict()  # request ids offered once already
        self._shadow_thread: threading.Thread | None = None
        self._shadow_stop = threading.Event()
        self.shadow_stats = {"queued": 0, "answered": 0, "preempted": 0, "skipped": 0}
        if resume:
            self.load_state()

    # ---- the trainer's state, under the names the rest of the lab knows ---------------------------
    @property
    def replay(self) -> ReplayBuffer:
        return self.trainer.replay

    @replay.setter
    def replay(self, value: ReplayBuffer) -> None:
        self.trainer.replay = value

    @property
    def ewc(self) -> EWCState:
        return self.trainer.ewc

    @ewc.setter
    def ewc(self, value: EWCState) -> None:
        self.trainer.ewc = value

    @property
    def updates(self) -> int:
        return self.trainer.updates

    # ---- the serving router ------------------------------------------------------------------
    @property
    def router(self) -> Any:
        with self._swap_lock:
            return self._router

    def route(self, x: RouterInput, state: Any = None) -> RoutingDecision:
        """The serving router's decision, with exploration (module docstring)."""
        router = self.router
        d = router.route(x, state)
        rate = self.lc.explore_rate
        i = self.tiers.index(d.tier) if d.tier in self.tiers else 0
        if x.forced_tier is not None or rate <= 0 or i == 0 or not getattr(router, "uses_fallback", False):
            return dataclasses.replace(d, propensity=1.0, explored=False, policy_tier=d.tier)
        with self._lock:
            u = float(self._rng.random())
        if u < rate:
            k = i if self.lc.explore_tiers == "cheaper" else 1  # candidates: tiers[i-k .. i-1]
            j = i - 1 - min(int(u / rate * k), k - 1)  # u / rate is uniform on [0, 1): reuse it, no second draw
            return dataclasses.replace(d, tier=self.tiers[j], propensity=rate / k, explored=True, policy_tier=d.tier)
        return dataclasses.replace(d, propensity=1.0 - rate, explored=False, policy_tier=d.tier)

    # ---- recording ---------------------------------------------------------------------------------
    def record(self, interaction: Interaction) -> None:
        """Log one interaction (cheap: no training, no I/O)."""
        unknown = (set(interaction.tier_scores) | set(interaction.signals)) - set(self.tiers)
        if unknown:
            raise ValueError(f"interaction {interaction.request_id}: scores for unknown tier(s) {sorted(unknown)}; "
                             f"configured tiers: {self.tiers}")
        for t, s in interaction.tier_scores.items():
            if s is None or not 0.0 <= float(s) <= 1.0:
                raise ValueError(f"interaction {interaction.request_id}: score for {t} must be in [0, 1], got {s!r}")
        if self.lc.shadow_rate <= 0:  # the texts only serve shadow evaluation
            interaction.query = interaction.answer = None
        if not self.lc.enabled:  # no cycle will ever drain a queue: keep only the tier-quality feature
            with self._lock:
                self._update_tier_quality(interaction.tier_scores)
            return
        with self._lock:
            self._pending.append(interaction)
            if len(self._pending) >= self.lc.max_pending:
                self._backlog.set()
            self._recent[interaction.request_id] = interaction
            self._recent.move_to_end(interaction.request_id)
            # a bounded window (learning.recent_interactions): the request log keeps every answer durably,
            # so this map only saves late feedback a rebuild (held whole for 10 000 answers: ~30 MB, issue 14)
            while len(self._recent) > self.lc.recent_interactions:
                self._recent.popitem(last=False)
            self._update_tier_quality(interaction.tier_scores)
        self._offer_shadow(interaction)

    def observe(self, x: RouterInput, decision: RoutingDecision, adequate: bool | None = None, *,
                signals: dict[str, Any] | None = None, cost: float | None = None, state: Any = None,
                request_id: str | None = None) -> Interaction:
        """Feed one observed (bandit) outcome through the serving path: the outcome of
        ``decision.tier`` only.  ``adequate`` is a gold verdict; or give the raw ``signals``
        (e.g. ``{"rating": 4}``).  Returns the recorded interaction; ``learn()`` trains on it."""
        if (adequate is None) == (signals is None):
            raise ValueError("give exactly one of adequate= or signals=")
        sig = {"gold": 1.0 if adequate else 0.0} if adequate is not None else dict(signals)
        with self._lock:
            rid = request_id or f"observed-{self.cycles}-{len(self._recent)}-{self._rng.integers(1 << 62)}"
        inter = Interaction(request_id=rid, x=x, decision=decision, cost=cost, state=state,
                            signals={decision.tier: sig})
        self.record(inter)
        return inter

    def add_score(self, request_id: str, tier: str, score: float) -> Interaction:
        """Late judged score (no known source) for a recorded request; read on the rating scale
        (``outcome``) and learned from next cycle."""
        return self._late(request_id, tier, score, {"score": float(score)})

    def add_feedback(self, request_id: str, tier: str, rating: int | None = None,
                     correction: str | None = None) -> Interaction:
        """User feedback on a recorded answer: a rating 1..5 and/or a correction (``outcome``)."""
        score = feedback_signal({"rating": rating, "correction": correction})
        if score is None:
            raise ValueError("feedback needs a rating, a correction, or both")
        sig: dict[str, Any] = {}
        if rating is not None:
            sig["rating"] = int(rating)
        if correction is not None and str(correction).strip():
            sig["correction"] = True
        return self._late(request_id, tier, score, sig)

    def _late(self, request_id: str, tier: str, score: float, signals: dict[str, Any]) -> Interaction:
        if tier not in self.tiers:
            raise ValueError(f"unknown tier {tier!r}; configured tiers: {self.tiers}")
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"score must be in [0, 1], got {score!r}")
        with self._lock:
            inter = self._recent.get(request_id)
            if inter is None:  # out of the window but not yet trained on: merge, never a second example
                inter = next((p for p in reversed(self._pending) if p.request_id == request_id), None)
            if inter is None:
                raise RequestNotFound(f"no recorded interaction {request_id!r} (only the last "
                                      f"{self.lc.recent_interactions} and those not yet trained on are kept)")
            inter.tier_scores[tier] = float(score)
            inter.signals.setdefault(tier, {}).update(signals)
            if not any(p is inter for p in self._pending):  # identity: dataclass == would compare arrays
                self._pending.append(inter)
                if len(self._pending) >= self.lc.max_pending:
                    self._backlog.set()
            self._update_tier_quality({tier: score})
        self._offer_shadow(inter)
        return inter

    def _update_tier_quality(self, scores: dict[str, float], alpha: float = 0.1) -> None:
        for t, s in scores.items():
            old = self._tier_quality.get(t)
            self._tier_quality[t] = float(s) if old is None else (1 - alpha) * old + alpha * float(s)

    def tier_quality(self) -> dict[str, float]:
        """Recent judged quality per tier (EMA, alpha 0.1): what RouterInput.tier_quality carries."""
        with self._lock:
            return dict(self._tier_quality)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def example_of(self, inter: Interaction) -> RouterExample | None:
        """The censored training row of one interaction: outcomes of the tiers it tried, nothing else."""
        outcomes = outcomes_of(inter, self.tiers, self.lc)
        if not outcomes:
            return None
        chosen = outcomes.get(inter.chosen_tier) if inter.chosen_tier else None
        d = inter.decision if (chosen is not None and chosen.adequate) else None  # imitate good answers only
        return RouterExample(x=inter.x, tier_scores=dict(inter.tier_scores),
                             outcomes={t: float(o.adequate) for t, o in outcomes.items()},
                             weights={t: o.weight for t, o in outcomes.items()},
                             context_items=d.context_items if d else None, temperature=d.temperature if d else None,
                             top_p=d.top_p if d else None, state=inter.state)

    # ---- one cycle -----------------------------------------------------------------------------------
    def learn(self) -> dict[str, Any]:
        """Run one learning cycle synchronously; returns its report (see module docstring)."""
        with self._train_lock:
            t0 = time.perf_counter()
            self.cycles += 1
            report: dict[str, Any] = {"cycle": self.cycles, "trained": False, "swapped": False}
            with self._lock:
                drained, self._pending = self._pending, []
                shadow_rows, self._shadow_rows = self._shadow_rows, []
            report["interactions"] = len(drained)
            report.update(self._update_memory(drained))
            new = []
            for inter in drained:
                e = self.example_of(inter)
                if e is None:
                    continue
                new.append(e)
                self._log_decision(inter, e)
            new += shadow_rows
            fresh, self._waiting = self._waiting + new, []
            report["new_examples"] = len(new)
            report["shadow_examples"] = len(shadow_rows)
            report["fresh_examples"] = len(fresh)
            if len(fresh) < self.lc.min_examples:
                self._waiting = fresh  # keep them for the next cycle
                report["reason"] = f"{len(fresh)} labelled examples waiting, need learning.min_examples={self.lc.min_examples}"
            else:
                try:
                    report.update(self._train_and_swap(fresh))
                except Exception as e:  # noqa: BLE001 - a failed step must never take the router down
                    log.exception("learning cycle %d failed; the serving router keeps its weights", self.cycles)
                    report["error"] = f"{type(e).__name__}: {e}"
                    report["dropped_examples"] = len(fresh)
            try:
                report["offpolicy"] = self.offpolicy_report()
            except Exception as e:  # noqa: BLE001 - a report must not fail the cycle
                log.exception("off-policy estimate failed")
                report["offpolicy_error"] = f"{type(e).__name__}: {e}"
            if report.get("swapped") and self.persist:
                try:
                    self.save_state()
                except Exception as e:  # noqa: BLE001
                    log.exception("saving learned state failed")
                    report["save_error"] = f"{type(e).__name__}: {e}"
            report["replay_size"] = len(self.replay)
            report["updates_total"] = self.updates
            report["shadow"] = dict(self.shadow_stats)
            report["duration_ms"] = (time.perf_counter() - t0) * 1000.0
            self.last_report = report
            return report

    def _update_memory(self, drained: list[Interaction]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.memory is not None:
            reinforced = 0
            try:
                for inter in drained:
                    score = inter.chosen_score
                    if inter.node_ids and score is not None:
                        self.memory.reinforce(inter.node_ids, 2.0 * score - 1.0)
                        reinforced += 1
                out["memory_pruned_edges"] = int(self.memory.decay() or 0)
            except Exception as e:  # noqa: BLE001 - memory trouble must not stop router learning
                log.exception("memory reinforcement failed")
                out["memory_error"] = f"{type(e).__name__}: {e}"
            out["memory_reinforced"] = reinforced
        if self.attention is not None:
            out.update(self._train_attention(drained))
        return out

    def _train_attention(self, drained: list[Interaction]) -> dict[str, Any]:
        """Train a copy of the serving ranker, then swap it in (queries keep ranking meanwhile)."""
        out: dict[str, Any] = {}
        jobs = []
        for inter in drained:
            score = inter.chosen_score
            if inter.node_ids and score is not None and score >= self.lc.quality_threshold:
                jobs.append(inter)
        if not jobs:
            out["attention_steps"] = 0
            return out
        with self._swap_lock:  # no other adopt() while copying
            candidate = copy.deepcopy(self.attention)
        losses = []
        try:
            for inter in jobs:
                sub = inter.subgraph
                if sub is None and self.memory is not None:
                    sub = self.memory.expand(inter.node_ids)
                if sub is None or len(sub) < 2:
                    continue  # nothing to rank against
                positives = [n for n in inter.node_ids if n in set(sub.node_ids)]
                if positives:
                    loss = candidate.train_step(np.asarray(inter.x.query_vec, np.float32), sub, positives)
                    losses.append(float(loss))
            if losses and all(np.isfinite(losses)):
                with self._swap_lock:
                    self.attention.adopt(candidate)  # the object the server holds starts serving the copy's net
        except Exception as e:  # noqa: BLE001
            log.exception("attention training failed; the serving ranker keeps its weights")
            out["attention_error"] = f"{type(e).__name__}: {e}"
        out["attention_steps"] = len(losses)
        if losses:
            out["attention_loss"] = float(np.mean(losses))
        return out

    def _train_and_swap(self, fresh: list[RouterExample]) -> dict[str, Any]:
        serving = self.router
        candidate = copy.deepcopy(serving)
        out: dict[str, Any] = {}
        if hasattr(candidate, "model") and hasattr(candidate, "featurise"):
            from ..router.train import ordinal_accuracy

            out.update(self.trainer.update(candidate, fresh))  # raises on non-finite: nothing committed
            out["train_ordinal_accuracy"] = ordinal_accuracy(candidate.model, candidate.featurise(fresh))
        else:
            rep = candidate.partial_fit(fresh + self.replay.sample(int(round(self.lc.replay_ratio * len(fresh)))))
            out.update({f"router_{k}": v for k, v in rep.items() if isinstance(v, (int, float, str, bool))})
            self.trainer.updates += 1
            out["steps"] = 1
        with self._swap_lock:
            self._router = candidate
        self.swaps += 1
        if hasattr(candidate, "model") and hasattr(candidate, "featurise"):
            out.update(self.trainer.end_task(candidate, fresh))
        else:
            self.trainer.remember(fresh, self.tiers)
        out.update(trained=True, swapped=True)
        return out

    # ---- off-policy evaluation ---------------------------------------------------------------------
    def _log_decision(self, inter: Interaction, example: RouterExample) -> None:
        d = inter.decision
        if d is None or inter.x.forced_tier is not None or d.tier not in (example.outcomes or {}):
            return
        with self._lock:
            self._logged[inter.request_id] = (inter.x, inter.state, d, float(example.outcomes[d.tier]), inter.cost)
            self._logged.move_to_end(inter.request_id)
            while len(self._logged) > self.lc.offpolicy_window:
                self._logged.popitem(last=False)

    def offpolicy_report(self) -> dict[str, Any]:
        """IPS / SNIPS / DR estimates from the logged window (module docstring, step 5)."""
        with self._lock:
            logged = list(self._logged.values())
        if not logged:
            return {"n": 0}
        index = {t: i for i, t in enumerate(self.tiers)}
        router = self.router

        def cum(probs: dict[str, float]) -> np.ndarray:
            return np.cumsum([probs.get(t, 0.0) for t in self.tiers])

        greedy, serving = [], []
        for x, state, d, reward, cost in logged:
            served = index[d.tier]
            c_log = cum(d.tier_probs)
            greedy.append(LoggedDecision(served, d.propensity, index[d.policy_tier or d.tier], reward, cost,
                                         float(c_log[index[d.policy_tier or d.tier]]), float(c_log[served])))
            now = router.route(x, state)
            c_now = cum(now.tier_probs)
            serving.append(LoggedDecision(served, d.propensity, index[now.tier], reward, cost,
                                          float(c_now[index[now.tier]]), float(c_now[served])))
        return {"logging_policy": off_policy_estimate(greedy), "serving_router": off_policy_estimate(serving)}

    # ---- shadow evaluation ---------------------------------------------------------------------------
    def _offer_shadow(self, inter: Interaction) -> None:
        """Queue a judged interaction for shadow evaluation with probability ``shadow_rate``; called
        as soon as its outcome is known (recorded with one, or when feedback arrives), so the idle
        pool can answer it before the next learning cycle."""
        if self.lc.shadow_rate <= 0 or not inter.query or inter.decision is None or len(self.tiers) < 2:
            return
        outcomes = outcomes_of(inter, self.tiers, self.lc)
        if inter.chosen_tier not in outcomes or len(outcomes) != 1:  # unjudged, or already two tiers
            return
        with self._lock:
            if inter.request_id in self._shadowed or float(self._rng.random()) >= self.lc.shadow_rate:
                return
            self._shadowed[inter.request_id] = None
            while len(self._shadowed) > 4 * self.lc.shadow_queue:
                self._shadowed.popitem(last=False)
            self._shadow_jobs.append(inter)
            self.shadow_stats["queued"] += 1

    def shadow_neighbour(self, inter: Interaction) -> str | None:
        """Next cheaper tier after an adequate answer, next larger after an inadequate one."""
        outcomes = outcomes_of(inter, self.tiers, self.lc)
        tier = inter.chosen_tier
        if tier not in outcomes:
            return None
        i = self.tiers.index(tier)
        j = i - 1 if outcomes[tier].adequate else i + 1
        return self.tiers[j] if 0 <= j < len(self.tiers) else None

    def shadow_step(self, answer: Answerer, busy: Callable[[], bool],
                    loaded: Callable[[], Sequence[str]] | None = None) -> str:
        """One shadow evaluation if the pool is idle; returns what happened ('idle-queue', 'busy',
        'skipped', 'preempted', 'answered').  The row it makes is trained on next cycle."""
        if busy():
            return "busy"
        with self._lock:
            inter = self._shadow_jobs.popleft() if self._shadow_jobs else None
        if inter is None:
            return "idle-queue"
        tier = self.shadow_neighbour(inter)
        if tier is None or (loaded is not None and tier not in loaded()):
            self.shadow_stats["skipped"] += 1
            return "skipped"
        result = answer(tier, inter.query, self.lc.shadow_max_tokens, busy)
        if result is None:  # a request arrived: give the pool back at once, retry the job later
            with self._lock:
                self._shadow_jobs.appendleft(inter)
            self.shadow_stats["preempted"] += 1
            return "preempted"
        text, logprobs = result
        signals: dict[str, Any] = {}
        original = outcomes_of(inter, self.tiers, self.lc).get(inter.chosen_tier)
        if original is None:  # feedback meanwhile made the served answer neutral: nothing to compare with
            self.shadow_stats["skipped"] += 1
            return "skipped"
        if inter.gold is not None:
            signals["gold"] = 1.0 if gold_match(text, inter.gold).matched else 0.0
        elif original.adequate and inter.answer:
            signals["agreement"] = answers_agree(text, inter.answer, inter.query or "")
        elif logprobs:
            signals["logprob"] = float(np.exp(np.mean(logprobs)))
        shadow = outcome_of(signals, self.lc)
        if shadow is None:
            self.shadow_stats["skipped"] += 1
            return "skipped"
        row = RouterExample(x=inter.x, state=inter.state,
                            outcomes={inter.chosen_tier: float(original.adequate), tier: float(shadow.adequate)},
                            weights={inter.chosen_tier: original.weight, tier: shadow.weight})
        with self._lock:
            self._shadow_rows.append(row)
        self.shadow_stats["answered"] += 1
        return "answered"

    def start_shadow(self, answer: Answerer, busy: Callable[[], bool],
                     loaded: Callable[[], Sequence[str]] | None = None) -> None:
        """Run ``shadow_step`` whenever idle, polling every ``learning.shadow_idle_ms`` (daemon thread)."""
        if self.lc.shadow_rate <= 0 or len(self.tiers) < 2:
            return
        if self._shadow_thread is not None and self._shadow_thread.is_alive():
            return
        self._shadow_stop.clear()

        def loop() -> None:
            while not self._shadow_stop.wait(self.lc.shadow_idle_ms / 1000.0):
                try:
                    while not self._shadow_stop.is_set() and self.shadow_step(answer, busy, loaded) == "answered":
                        pass
                except Exception:  # noqa: BLE001 - shadow evaluation is best effort
                    log.exception("shadow evaluation failed")

        self._shadow_thread = threading.Thread(target=loop, name="ruvllm-shadow", daemon=True)
        self._shadow_thread.start()

    # ---- background thread ------------------------------------------------------------------------------
    def start(self) -> None:
        """Run ``learn()`` every ``learning.training_interval_ms`` in a daemon thread (idempotent)."""
        if not self.lc.enabled:
            raise RuntimeError("learning.enabled is false: the background learner will not start")
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="ruvllm-learning", daemon=True)
        self._thread.start()

    def wait_for_cycle(self, stop: threading.Event) -> bool:
        """Block until the next cycle is due -- ``learning.training_interval_ms`` after the last, or
        sooner once ``learning.max_pending`` interactions wait (a burst of requests must not grow the
        queue without bound) -- and return True; return False as soon as `stop` is set."""
        deadline = time.monotonic() + self.lc.training_interval_ms / 1000.0
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._backlog.wait(min(remaining, STOP_POLL_S)):
                self._backlog.clear()
                return not stop.is_set()
        return False

    def _loop(self) -> None:
        while self.wait_for_cycle(self._stop):
            try:
                self.learn()
            except Exception:  # noqa: BLE001 - learn() reports its own errors; this is a last guard
                log.exception("background learning cycle crashed")

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the background threads after their current step."""
        self._stop.set()
        self._shadow_stop.set()
        for attr in ("_thread", "_shadow_thread"):
            thread = getattr(self, attr)
            if thread is not None:
                thread.join(timeout)
                setattr(self, attr, None)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- persistence --------------------------------------------------------------------------------------
    def state_paths(self) -> dict[str, Path]:
        paths = {k: self.config.data_dir / name for k, name in STATE_FILES.items()}
        paths["trainer_state"] = self.config.data_dir / TRAINER_STATE_FILE
        return paths

    def save_state(self) -> dict[str, Path]:
        """Every learned state file, each written atomically and loadable with weights_only=True."""
        paths = self.state_paths()
        router = self.router
        if hasattr(router, "save"):
            _atomic(paths["router_weights"], router.save)
        if self.ewc.fisher:
            self.ewc.save(paths["ewc_state"])
        self.replay.save(paths["replay_buffer"])
        _atomic(paths["trainer_state"], lambda p: torch.save(self.trainer.state_dict(), p))
        if self.attention is not None and hasattr(self.attention, "save"):
            _atomic(paths["attention_weights"], self.attention.save)
        return paths

    def load_state(self) -> list[str]:
        """Restore whatever learned state exists in ``system.data_dir``; returns the names loaded.

        A file from an incompatible version (e.g. a router saved before the ordinal heads) is
        skipped with a warning: the service starts fresh for that part rather than not at all.
        Nothing is unpickled: every file is read with ``torch.load(weights_only=True)``."""
        paths, loaded = self.state_paths(), []

        def attempt(name: str, fn) -> None:
            if not paths[name].exists():
                return
            try:
                fn(paths[name])
                loaded.append(name)
            except Exception as e:  # noqa: BLE001 - a bad file must not stop the server
                log.warning("not loading %s (%s): %s", paths[name], type(e).__name__, e)

        if hasattr(self._router, "load"):
            attempt("router_weights", self._router.load)

        def load_ewc(path):
            state = EWCState.load(path)
            state.lam, state.gamma = self.lc.ewc_lambda, self.lc.ewc_gamma  # the config wins over the file
            self.ewc = state

        attempt("ewc_state", load_ewc)
        attempt("replay_buffer", lambda p: setattr(self, "replay", ReplayBuffer.load(p)))
        attempt("trainer_state", lambda p: self.trainer.load_state_dict(torch.load(p, weights_only=True)))
        if self.attention is not None and hasattr(self.attention, "load"):
            attempt("attention_weights", self.attention.load)
        return loaded


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)  # a crash never leaves a half-written state file
