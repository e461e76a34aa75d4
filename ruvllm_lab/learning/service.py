"""LearningService: turns logged interactions into router training, memory reinforcement and
attention training, without ever blocking a query.

Cycle (``learn()``; ``start()`` runs it every ``learning.training_interval_ms`` in a daemon thread)
--------------------------------------------------------------------------------------------------
1. Drain the interactions recorded since the last cycle.  Each one whose per-tier judge
   scores are known becomes a :class:`RouterExample` labelled by :func:`label_from_scores`
   (the cheapest tier -- ``tiers`` are ordered smallest first -- whose score reaches
   ``learning.quality_threshold``, else the best-scoring tier tried).
2. Memory: the nodes an answer used are reinforced with reward ``2 * score - 1`` (the chosen
   tier's score mapped to [-1, 1]), then edges decay once; the attention ranker takes one
   step per well-judged answer with the nodes it used as positives.
3. Router: once ``learning.min_examples`` fresh examples are waiting, a *copy* of the serving
   router trains for ``learning.steps_per_cycle`` steps.  Each batch of ``learning.batch_size``
   mixes fresh examples with ``round(replay_ratio * batch_size)`` examples replayed from the
   reservoir (:class:`ReplayBuffer`), and the loss adds the online-EWC penalty
   lam/2 sum F (theta - theta*)^2 (:class:`EWCState`).  Afterwards the Fisher is re-estimated
   on the fresh examples (per-sample) and consolidated: F <- gamma F_old + F_new.
4. Swap: only when every step's loss and every weight is finite does the trained copy become
   the serving router (one reference assignment under a lock); otherwise the error is
   logged, reported, the old router keeps serving, and that cycle's fresh examples are
   dropped so one poisoned example cannot fail every later cycle.
5. Fresh examples join the replay buffer; router weights, EWC state, replay buffer (and the
   attention weights) are saved in ``system.data_dir`` under the names in ``STATE_FILES``.

Routers that are not torch modules (knn, logreg, ...) are updated by ``partial_fit`` on a
copy with the same replay mix; EWC does not apply to them.

``updates`` counts optimiser steps on the serving router since creation -- the unit of the
"forgetting per 10K updates" metric (``learning.metrics``).
"""
from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import STATE_FILES, Config
from ..errors import RequestNotFound
from ..router.base import RouterExample, RouterInput, RoutingDecision
from .ewc import EWCState
from .replay import ReplayBuffer

log = logging.getLogger(__name__)

RECENT_INTERACTIONS = 10_000  # how many interactions late feedback can still reach


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


def label_from_scores(tier_scores: dict[str, float], tiers: Sequence[str], threshold: float) -> str | None:
    """The cheapest tier (first in `tiers`) scoring >= threshold; else the best-scoring tier; None if unscored."""
    scored = [(t, tier_scores[t]) for t in tiers if tier_scores.get(t) is not None]
    if not scored:
        return None
    for t, s in scored:
        if s >= threshold:
            return t
    return max(scored, key=lambda ts: ts[1])[0]


def _batch_as_dict(batch) -> dict[str, torch.Tensor]:
    return {f.name: getattr(batch, f.name) for f in fields(batch)}


class LearningService:
    """See the module docstring.  ``router`` is the serving router; read it per request."""

    def __init__(self, config: Config, router: Any, memory: Any = None, attention: Any = None,
                 judge: Any = None, resume: bool = True):
        self.config = config
        self.lc = config.learning
        self.memory = memory
        self.attention = attention
        self.judge = judge
        self._router = router
        self.tiers: list[str] = list(router.tiers)
        self.replay = ReplayBuffer(self.lc.replay_capacity, self.lc.replay_balance_by_tier, seed=config.system.seed)
        self.ewc = EWCState(lam=self.lc.ewc_lambda, gamma=self.lc.ewc_gamma)
        self.updates = 0  # optimiser steps applied to the serving router
        self.cycles = 0
        self.swaps = 0
        self.last_report: dict[str, Any] = {}
        self._pending: list[Interaction] = []
        self._waiting: list[RouterExample] = []  # labelled, not yet trained on (fewer than min_examples)
        self._recent: OrderedDict[str, Interaction] = OrderedDict()
        self._tier_quality: dict[str, float] = {}  # exponential moving average of judged scores
        self._rng = np.random.default_rng(config.system.seed)
        self._lock = threading.Lock()  # pending / recent / tier quality
        self._swap_lock = threading.Lock()  # the serving-router reference
        self._train_lock = threading.Lock()  # one cycle at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if resume:
            self.load_state()

    # ---- the serving router ------------------------------------------------------------------
    @property
    def router(self) -> Any:
        with self._swap_lock:
            return self._router

    def route(self, x: RouterInput, state: Any = None) -> RoutingDecision:
        return self.router.route(x, state)

    # ---- recording ---------------------------------------------------------------------------------
    def record(self, interaction: Interaction) -> None:
        """Log one interaction (cheap: no training, no I/O)."""
        unknown = set(interaction.tier_scores) - set(self.tiers)
        if unknown:
            raise ValueError(f"interaction {interaction.request_id}: scores for unknown tier(s) {sorted(unknown)}; "
                             f"configured tiers: {self.tiers}")
        for t, s in interaction.tier_scores.items():
            if s is None or not 0.0 <= float(s) <= 1.0:
                raise ValueError(f"interaction {interaction.request_id}: score for {t} must be in [0, 1], got {s!r}")
        with self._lock:
            self._pending.append(interaction)
            self._recent[interaction.request_id] = interaction
            self._recent.move_to_end(interaction.request_id)
            while len(self._recent) > RECENT_INTERACTIONS:
                self._recent.popitem(last=False)
            self._update_tier_quality(interaction.tier_scores)

    def add_score(self, request_id: str, tier: str, score: float) -> Interaction:
        """Late judgement (e.g. user feedback) for a recorded request; it is learned from next cycle."""
        if tier not in self.tiers:
            raise ValueError(f"unknown tier {tier!r}; configured tiers: {self.tiers}")
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"score must be in [0, 1], got {score!r}")
        with self._lock:
            inter = self._recent.get(request_id)
            if inter is None:
                raise RequestNotFound(f"no recorded interaction {request_id!r} (only the last "
                                      f"{RECENT_INTERACTIONS} are kept)")
            inter.tier_scores[tier] = float(score)
            if not any(p is inter for p in self._pending):  # identity: dataclass == would compare arrays
                self._pending.append(inter)
            self._update_tier_quality({tier: score})
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
        label = label_from_scores(inter.tier_scores, self.tiers, self.lc.quality_threshold)
        if label is None:
            return None
        good = (inter.chosen_score or 0.0) >= self.lc.quality_threshold
        d = inter.decision if good else None  # imitate the sampling/context settings of good answers only
        return RouterExample(x=inter.x, best_tier=label, tier_scores=dict(inter.tier_scores),
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
            report["interactions"] = len(drained)
            report.update(self._update_memory(drained))
            new = [e for e in (self.example_of(i) for i in drained) if e is not None]
            fresh, self._waiting = self._waiting + new, []
            report["new_examples"] = len(new)
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
                if report.get("swapped"):
                    for e in fresh:
                        self.replay.add(e, tier=e.best_tier)
                    try:
                        self.save_state()
                    except Exception as e:  # noqa: BLE001
                        log.exception("saving learned state failed")
                        report["save_error"] = f"{type(e).__name__}: {e}"
            report["replay_size"] = len(self.replay)
            report["updates_total"] = self.updates
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
            losses = []
            try:
                for inter in drained:
                    score = inter.chosen_score
                    if not inter.node_ids or score is None or score < self.lc.quality_threshold:
                        continue
                    sub = inter.subgraph
                    if sub is None and self.memory is not None:
                        sub = self.memory.expand(inter.node_ids)
                    if sub is None or len(sub) < 2:
                        continue  # nothing to rank against
                    positives = [n for n in inter.node_ids if n in set(sub.node_ids)]
                    if positives:
                        loss = self.attention.train_step(np.asarray(inter.x.query_vec, np.float32), sub, positives)
                        losses.append(float(loss))
            except Exception as e:  # noqa: BLE001
                log.exception("attention training failed")
                out["attention_error"] = f"{type(e).__name__}: {e}"
            out["attention_steps"] = len(losses)
            if losses:
                out["attention_loss"] = float(np.mean(losses))
        return out

    def _mixed_examples(self, fresh: list[RouterExample], n: int) -> list[RouterExample]:
        n_replay = int(round(self.lc.replay_ratio * n)) if len(self.replay) else 0
        n_fresh = n - n_replay
        idx = self._rng.choice(len(fresh), size=n_fresh, replace=n_fresh > len(fresh))
        return [fresh[i] for i in idx] + self.replay.sample(n_replay)

    def _train_and_swap(self, fresh: list[RouterExample]) -> dict[str, Any]:
        serving = self.router
        candidate = copy.deepcopy(serving)
        bs, steps = self.lc.batch_size, self.lc.steps_per_cycle
        out: dict[str, Any] = {"steps": steps}
        if hasattr(candidate, "model") and hasattr(candidate, "featurise"):
            from ..router.train import accuracy, router_loss, train_steps

            model = candidate.model
            optimizer = torch.optim.Adam(model.parameters(), lr=self.lc.learning_rate)
            batches = [candidate.featurise(self._mixed_examples(fresh, bs)) for _ in range(steps)]
            penalty = self.ewc.penalty if self.ewc.active else None
            losses = train_steps(model, batches, optimizer=optimizer, extra_penalty=penalty,
                                 masks=getattr(candidate, "masks", None) or None)
            bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
            if bad or not all(torch.isfinite(p).all() for p in model.parameters()):
                raise FloatingPointError(f"non-finite loss or weights after training (first bad step {bad[:1]})")
            fresh_batch = candidate.featurise(fresh)
            out.update(loss_first=losses[0], loss_last=losses[-1], train_accuracy=accuracy(model, fresh_batch))
            if self.ewc.active:
                out["ewc_penalty"] = float(self.ewc.penalty(model).detach())
            if self.lc.ewc_lambda > 0:
                minis = [_batch_as_dict(b) for b in fresh_batch.minibatches(bs)]
                # router_loss branches on the data (masked targets), which vmap cannot trace: loop
                new_fisher = self.ewc.consolidate(model, minis, lambda m, d: router_loss(m, type(fresh_batch)(**d)),
                                                  per_sample=True, method="loop")
                out["fisher_mean"] = float(torch.cat([f.flatten() for f in new_fisher.values()]).mean())
            candidate.trained = True
        else:
            rep = candidate.partial_fit(self._mixed_examples(fresh, max(bs, len(fresh))))
            out.update({f"router_{k}": v for k, v in rep.items() if isinstance(v, (int, float, str, bool))})
            steps = 1
            out["steps"] = 1
        with self._swap_lock:
            self._router = candidate
        self.updates += steps
        self.swaps += 1
        out.update(trained=True, swapped=True)
        return out

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

    def _loop(self) -> None:
        interval = self.lc.training_interval_ms / 1000.0
        while not self._stop.wait(interval):
            try:
                self.learn()
            except Exception:  # noqa: BLE001 - learn() reports its own errors; this is a last guard
                log.exception("background learning cycle crashed")

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the background thread after its current cycle."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- persistence --------------------------------------------------------------------------------------
    def state_paths(self) -> dict[str, Path]:
        return {k: self.config.data_dir / name for k, name in STATE_FILES.items()}

    def save_state(self) -> dict[str, Path]:
        paths = self.state_paths()
        router = self.router
        if hasattr(router, "save"):
            router.save(paths["router_weights"])
        if self.ewc.fisher:
            self.ewc.save(paths["ewc_state"])
        self.replay.save(paths["replay_buffer"])
        if self.attention is not None and hasattr(self.attention, "save"):
            self.attention.save(paths["attention_weights"])
        return paths

    def load_state(self) -> list[str]:
        """Restore whatever learned state exists in ``system.data_dir``; returns the names loaded."""
        paths, loaded = self.state_paths(), []
        if paths["router_weights"].exists() and hasattr(self._router, "load"):
            self._router.load(paths["router_weights"])
            loaded.append("router_weights")
        if paths["ewc_state"].exists():
            state = EWCState.load(paths["ewc_state"])
            state.lam, state.gamma = self.lc.ewc_lambda, self.lc.ewc_gamma  # the config wins over the file
            self.ewc = state
            loaded.append("ewc_state")
        if paths["replay_buffer"].exists():
            self.replay = ReplayBuffer.load(paths["replay_buffer"])
            loaded.append("replay_buffer")
        if self.attention is not None and paths["attention_weights"].exists() and hasattr(self.attention, "load"):
            self.attention.load(paths["attention_weights"])
            loaded.append("attention_weights")
        return loaded
