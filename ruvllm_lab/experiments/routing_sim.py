"""Routing simulation: routers learn online, in arrival order, from a cached outcome matrix.

Prequential (test-then-train): each router routes query t, is charged the outcome of the tier it
picked, then learns what it was allowed to observe.  Two feedback modes:

* ``bandit`` -- what serving sees: only the outcome of the tier the router served (its exploration
  included): ``LearningService.route`` (serving rule + ``learning.explore_rate`` exploration,
  propensities recorded) -> ``observe`` -> ``learn`` every ``update_every`` queries.
* ``full`` -- RouteLLM's offline setting: after query t every tier's outcome on it is recorded
  (``LearningService.record`` with one gold signal per tier, as shadow evaluation or forced tiers
  would give) and routing uses the serving router without exploration.

Every learned router (fastgrnn, knn, logreg) learns through the same ``LearningService`` path the
server runs -- the same observations, the same replay (``learning.replay_*``): FastGRNN through the
``ContinualTrainer``, the classifier baselines through their ``partial_fit`` (a censored row they
cannot turn into an exact label is skipped, never invented).  The oracle is fitted on every label
up front (upper bound, evaluation only); fixed policies (always-*, random) never learn.

Router inputs (``RouterInput``): the query's embedding and token count, the best cosine
similarity to the earlier queries and how many of them pass ``similarity_threshold`` (a memory of
past queries), and ``tier_quality`` -- each tier's accuracy *as this router has observed it*
(every tier in ``full`` mode; only its own observations in ``bandit`` mode).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..workloads import WorkItem
from .outcomes import OutcomeMatrix

FEEDBACK_MODES = ("bandit", "full")
FIXED_POLICIES = ("random", "always-smallest", "always-largest")


def is_fixed_policy(name: str) -> bool:
    """Routers whose choice does not depend on a learned score: their cost-quality "curve" is a chord."""
    return name in FIXED_POLICIES or name.startswith("always-")


def build_inputs(items: Sequence[WorkItem], vectors: np.ndarray, token_counts: Sequence[int],
                 tiers: Sequence[str], labels_correct: np.ndarray | None = None, *, max_tokens: int | None = None,
                 similarity_threshold: float = 0.5, max_hits: int = 8) -> list:
    """One ``RouterInput`` per item, in arrival order.

    ``top_similarity``/``hit_count`` describe a memory holding the queries seen before this one
    (max cosine, and how many past queries reach ``similarity_threshold``, capped at
    ``max_hits``).  ``tier_quality[tier]`` is that tier's accuracy over the earlier queries when
    ``labels_correct`` (Q, T) is given (full information), else empty (the simulation fills it
    with what each router observed).
    """
    from ..router import RouterInput

    vecs = np.asarray(vectors, np.float32)
    inputs = []
    for i, item in enumerate(items):
        if i:
            sims = vecs[:i] @ vecs[i]
            top, hits = float(sims.max()), int(min(max_hits, (sims >= similarity_threshold).sum()))
        else:
            top, hits = 0.0, 0
        quality = {}
        if labels_correct is not None and i:
            quality = {t: float(labels_correct[:i, j].mean()) for j, t in enumerate(tiers)}
        inputs.append(RouterInput(query_vec=vecs[i], query_tokens=int(token_counts[i]), top_similarity=top,
                                  hit_count=hits, mean_degree=0.0, session_turn=0, tier_quality=quality,
                                  max_latency_ms=None, max_tokens=max_tokens))
    return inputs


@dataclass
class RouterTrace:
    """What one router did over the workload, query by query."""

    name: str
    chosen: np.ndarray  # (Q,) tier index served (after fallback and exploration)
    policy: np.ndarray  # (Q,) the router's most probable tier (argmax of tier_probs): no fallback, no exploration
    probs: np.ndarray  # (Q, T) the router's tier distribution at decision time
    fallback: np.ndarray  # (Q,) bool: the confidence fallback decided
    explored: np.ndarray  # (Q,) bool: exploration replaced the policy's pick
    propensity: np.ndarray  # (Q,) probability with which the served tier was chosen
    route_ms: np.ndarray  # (Q,) wall time of route()
    fit_ms: float = 0.0  # total wall time learning
    updates: int = 0  # learning cycles that trained the router
    observed: int = 0  # (query, tier) outcomes the router was shown


class _Observed:
    """Per-tier success counts as one router has observed them (its ``tier_quality`` feature)."""

    def __init__(self, tiers: Sequence[str]):
        self.tiers = list(tiers)
        self.n = np.zeros(len(tiers))
        self.ok = np.zeros(len(tiers))

    def add(self, j: int, ok: bool) -> None:
        self.n[j] += 1
        self.ok[j] += float(ok)

    def quality(self) -> dict[str, float]:
        return {t: float(self.ok[j] / self.n[j]) for j, t in enumerate(self.tiers) if self.n[j]}


def _with_quality(x: Any, quality: dict[str, float]) -> Any:
    return dataclasses.replace(x, tier_quality=quality)


def simulate(router: Any, inputs: Sequence[Any], outcomes: OutcomeMatrix, *, feedback: str = "bandit",
             update_every: int = 8, unsolved: str = "smallest", learning_service: Any = None) -> RouterTrace:
    """Run one router over the workload (module docstring).

    A learned router needs ``learning_service``, a ``LearningService`` wrapping it: it routes
    through the service (in ``bandit`` mode with the service's exploration; in ``full`` mode with
    the serving router's own decision, RouteLLM's setting), its observations are recorded there
    and ``learn()`` runs every ``update_every`` queries -- the server's code path in both modes.
    The oracle is fitted on every label up front; fixed policies only route.
    """
    from ..learning.service import Interaction
    from ..router import RouterExample

    if feedback not in FEEDBACK_MODES:
        raise ValueError(f"feedback must be one of {FEEDBACK_MODES}, got {feedback!r}")
    name = getattr(router, "name", str(router))
    tiers = list(outcomes.tiers)
    q, t_n = len(inputs), len(tiers)
    if q != len(outcomes.items):
        raise ValueError(f"{q} router inputs for {len(outcomes.items)} outcome rows")
    is_oracle = name == "oracle"
    learns = not is_oracle and not is_fixed_policy(name)
    if learns and learning_service is None:
        raise ValueError(f"router {name!r} learns: give it a learning_service (the serving path)")
    trace = RouterTrace(name, np.zeros(q, np.int64), np.zeros(q, np.int64), np.zeros((q, t_n)), np.zeros(q, bool),
                        np.zeros(q, bool), np.ones(q), np.zeros(q))
    if is_oracle:
        t0 = time.perf_counter()
        labels = outcomes.labels(unsolved)
        router.fit([RouterExample(x=x, best_tier=tiers[int(y)]) for x, y in zip(inputs, labels)])
        trace.fit_ms += (time.perf_counter() - t0) * 1000
    seen = _Observed(tiers)
    for i, x0 in enumerate(inputs):
        x = _with_quality(x0, seen.quality())
        t0 = time.perf_counter()
        if not learns:
            d = router.route(x)
        elif feedback == "bandit":
            d = learning_service.route(x)  # the serving rule plus exploration, propensity recorded
        else:
            d = learning_service.router.route(x)
        trace.route_ms[i] = (time.perf_counter() - t0) * 1000
        pick = tiers.index(d.tier)
        trace.chosen[i] = pick
        trace.probs[i] = [d.tier_probs.get(t, 0.0) for t in tiers]
        trace.policy[i] = int(np.argmax(trace.probs[i]))
        trace.fallback[i] = bool(d.fallback_used)
        trace.explored[i] = bool(getattr(d, "explored", False))
        trace.propensity[i] = float(getattr(d, "propensity", 1.0))
        if not learns:
            continue
        cost = float(outcomes.cost[i, pick])
        if feedback == "bandit":  # only the served tier's outcome exists
            ok = bool(outcomes.correct[i, pick])
            learning_service.observe(x, d, adequate=ok, cost=cost)
            seen.add(pick, ok)
            trace.observed += 1
        else:  # every tier answered and was judged against the gold (RouteLLM's offline data)
            signals = {t: {"gold": float(outcomes.correct[i, j])} for j, t in enumerate(tiers)}
            learning_service.record(Interaction(request_id=f"full-{i}", x=x, decision=d, cost=cost, signals=signals))
            for j in range(t_n):
                seen.add(j, bool(outcomes.correct[i, j]))
            trace.observed += t_n
        if (i + 1) % update_every == 0 or i == q - 1:
            t0 = time.perf_counter()
            report = learning_service.learn()
            trace.fit_ms += (time.perf_counter() - t0) * 1000
            trace.updates += int(bool(report.get("trained")))  # a cycle below learning.min_examples trains nothing
    return trace


def threshold_curve(probs: np.ndarray, correct: np.ndarray, cost: np.ndarray, max_points: int = 41):
    """Cost-quality points of the cumulative-threshold rule, closed by always-largest.

    At threshold tau a query goes to the cheapest tier i with ``P(best tier <= i) >= tau`` (tau = 0:
    always-smallest).  With two tiers this is RouteLLM's threshold on the strong model's win
    probability.  Returns a DataFrame (tau, cost, quality, largest_share).
    """
    import math

    import pandas as pd

    cum = np.cumsum(probs, axis=1)  # (Q, T)
    taus = np.unique(np.concatenate([[0.0], np.round(cum.ravel(), 9)]))
    if taus.size > max_points:
        taus = np.unique(np.quantile(taus, np.linspace(0, 1, max_points)))
    q_idx = np.arange(len(probs))
    last = correct.shape[1] - 1
    rows = []
    for tau in taus:
        tier = np.argmax(cum >= tau - 1e-9, axis=1)  # first tier whose cumulative mass reaches tau
        rows.append({"tau": float(tau), "cost": float(cost[q_idx, tier].mean()),
                     "quality": float(correct[q_idx, tier].mean()), "largest_share": float((tier == last).mean())})
    rows.append({"tau": math.inf, "cost": float(cost[:, last].mean()), "quality": float(correct[:, last].mean()),
                 "largest_share": 1.0})
    return pd.DataFrame(rows)
