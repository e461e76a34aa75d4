"""Cost-quality metrics of a router, after RouteLLM (Ong et al., 2024, "RouteLLM: Learning to
Route LLMs with Preference Data", §5, and ``routellm/evals/evaluate.py``), generalised from
two models to a tier ladder, plus the bootstrap interval every experiment reports.

A router with a knob (a threshold) traces a **cost-quality curve**: points ``(c_i, q_i)``
where ``c`` is the x-axis and ``q`` the quality (accuracy) at that knob setting.  RouteLLM's
x-axis is the *share of calls to the strong model* (``strong_percentage / 100``); AUC is
``np.trapz(accuracy, strong_share)`` over the router's points and APGR
``(AUC - AUC_weak) / (AUC_strong - AUC_weak)`` with the constant weak/strong accuracies
integrated over the same x-range -- exactly ``apgr`` below.  **How the ladder generalisation
differs:** with more than two tiers "calls to the strong model" no longer measures spend (a
call to a middle tier costs something but is not a strong call), so the routing experiment's
x-axis is the *normalised cost*

    c = (cost - cost_weak) / (cost_strong - cost_weak)        in [0, 1]

where cost is parameter-weighted tokens and ``cost_weak``/``cost_strong`` are the mean
per-query costs of always-smallest and always-largest.  With two tiers and a fixed cost per
call this *is* the strong-call share; with token-weighted cost it differs by the variation
of answer lengths.  (The experiment also reports the share of calls to the largest tier.)

Definitions (``q_weak``/``q_strong``: quality of always-smallest / always-largest):

* **PGR** (performance gap recovered) of one point: ``(q - q_weak) / (q_strong - q_weak)``.
* **APGR** (average PGR): the area under the curve over ``c`` (trapezoid rule, points sorted by
  ``c``) relative to the areas under the constant weak and strong lines on the same ``c``
  range::

      APGR = (AUC - q_weak * (c_max - c_min)) / ((q_strong - q_weak) * (c_max - c_min))

  For a curve spanning [0, 1] this is the mean PGR over cost.  1.0 means the router recovers
  all of the strong model's advantage at every cost; a random router scores about 0.5.
* **CPT(x%)** (call-performance threshold): the smallest normalised cost at which the
  curve reaches quality ``q_weak + x/100 * (q_strong - q_weak)``; linear interpolation between
  the points, walking the curve from cheap to expensive (for a monotone curve this is
  RouteLLM's ``np.interp``).  ``nan`` when the curve never reaches it.
* **Cost reduction at matched quality**: ``1 - cost_at(q_strong) / cost_strong`` in absolute
  cost units, where ``cost_at(q)`` is the first-crossing cost as in CPT.  ``nan`` when the
  router never matches always-largest.

* **Bootstrap CI** (``bootstrap_ci``): mean over replicates (seeds) and the percentile
  bootstrap interval of that mean.
* **Median CI** (``median_ci``): the distribution-free (sign-test) interval of a median, for
  skewed samples such as latencies.

All functions are pure: arrays in, floats out.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _curve(costs: Sequence[float], qualities: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(costs, dtype=np.float64).reshape(-1)
    q = np.asarray(qualities, dtype=np.float64).reshape(-1)
    if c.shape != q.shape:
        raise ValueError(f"costs and qualities must have the same length, got {c.shape[0]} and {q.shape[0]}")
    if c.size == 0:
        raise ValueError("a cost-quality curve needs at least one point")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(q))):
        raise ValueError("costs and qualities must be finite")
    order = np.lexsort((q, c))  # by cost, ties by quality (a vertical step walks upward)
    return c[order], q[order]


def normalised_cost(cost: float | np.ndarray, cost_weak: float, cost_strong: float) -> float | np.ndarray:
    """(cost - cost_weak) / (cost_strong - cost_weak); raises when the two anchors coincide."""
    if not cost_strong > cost_weak:
        raise ValueError(f"cost_strong ({cost_strong}) must exceed cost_weak ({cost_weak})")
    return (np.asarray(cost, dtype=np.float64) - cost_weak) / (cost_strong - cost_weak)


def pgr(quality: float, q_weak: float, q_strong: float) -> float:
    """Performance gap recovered by one operating point; nan when q_strong == q_weak."""
    gap = q_strong - q_weak
    return float("nan") if gap == 0 else (quality - q_weak) / gap


def auc(costs: Sequence[float], qualities: Sequence[float]) -> float:
    """Trapezoid area under the curve over cost (points sorted by cost)."""
    c, q = _curve(costs, qualities)
    if c.size == 1:
        return 0.0
    return float(np.sum((c[1:] - c[:-1]) * (q[1:] + q[:-1]) / 2.0))


def apgr(costs: Sequence[float], qualities: Sequence[float], q_weak: float, q_strong: float) -> float:
    """Average performance gap recovered (see module docstring); nan on a zero gap or zero-width curve."""
    c, q = _curve(costs, qualities)
    width = c[-1] - c[0]
    gap = q_strong - q_weak
    if width <= 0 or gap == 0:
        return float("nan")
    return (auc(c, q) - q_weak * width) / (gap * width)


def cost_at_quality(costs: Sequence[float], qualities: Sequence[float], target: float) -> float:
    """First cost at which the curve (walked from cheap to expensive) reaches ``target``; nan if never."""
    c, q = _curve(costs, qualities)
    if q[0] >= target:
        return float(c[0])
    for i in range(1, c.size):
        if q[i] >= target:
            # the segment (c[i-1], q[i-1]) -> (c[i], q[i]) crosses target; q[i-1] < target <= q[i]
            t = (target - q[i - 1]) / (q[i] - q[i - 1])
            return float(c[i - 1] + t * (c[i] - c[i - 1]))
    return float("nan")


def cpt(costs: Sequence[float], qualities: Sequence[float], q_weak: float, q_strong: float, pct: float) -> float:
    """Call-performance threshold: normalised cost to recover ``pct`` percent of the gap (nan if never)."""
    if not 0 <= pct <= 100:
        raise ValueError(f"pct must be in [0, 100], got {pct}")
    return cost_at_quality(costs, qualities, q_weak + pct / 100.0 * (q_strong - q_weak))


def cost_reduction_at_matched_quality(costs: Sequence[float], qualities: Sequence[float],
                                      q_strong: float, cost_strong: float) -> float:
    """1 - cost_at(q_strong) / cost_strong, costs in absolute units; nan if q_strong is never reached."""
    if cost_strong <= 0:
        raise ValueError(f"cost_strong must be > 0, got {cost_strong}")
    c = cost_at_quality(costs, qualities, q_strong)
    return float("nan") if math.isnan(c) else 1.0 - c / cost_strong


def cost_reduction(cost: float, cost_strong: float) -> float:
    """1 - cost / cost_strong at one operating point."""
    if cost_strong <= 0:
        raise ValueError(f"cost_strong must be > 0, got {cost_strong}")
    return 1.0 - cost / cost_strong


def optimal_curve(correct: np.ndarray, tier_costs: Sequence[float], n_points: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """The oracle's cost-quality frontier on an outcome matrix (RouteLLM's "optimal" line, per ladder).

    ``correct`` (Q, T) bool, tiers sorted by cost.  Budget sweep: start from all-smallest, then
    upgrade queries in order of the cheapest upgrade that turns a wrong answer right, until the
    budget is spent.  Returns (mean cost per query, quality) at ``n_points`` budgets between the
    all-smallest and all-largest costs.
    """
    correct = np.asarray(correct, dtype=bool)
    costs = np.asarray(tier_costs, dtype=np.float64)
    nq, nt = correct.shape
    if nt != costs.size:
        raise ValueError(f"correct has {nt} tiers but {costs.size} costs were given")
    # the cheapest correct tier per query, or nothing if none is correct (stays at tier 0)
    any_ok = correct.any(axis=1)
    first_ok = np.where(any_ok, correct.argmax(axis=1), 0)
    base_ok = correct[:, 0]
    upgrade = np.where(any_ok & ~base_ok, costs[first_ok] - costs[0], np.inf)
    order = np.argsort(upgrade, kind="stable")
    budgets = np.linspace(costs[0] * nq, costs[-1] * nq, n_points)
    out_c, out_q = [], []
    for b in budgets:
        spent, n_ok = costs[0] * nq, int(base_ok.sum())
        for i in order:
            if not np.isfinite(upgrade[i]) or spent + upgrade[i] > b + 1e-9:
                break
            spent += upgrade[i]
            n_ok += 1
        out_c.append(b / nq)
        out_q.append(n_ok / nq)
    return np.asarray(out_c), np.asarray(out_q)


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval of the mean: ``(mean, low, high)``.

    ``values``: one number per independent replicate (e.g. one per seed); NaNs (a metric a
    replicate cannot define) are dropped first.  With no value left all three are nan; with one
    value the interval is that value (no spread can be estimated -- the caller flags it).
    Resampling is seeded, so the interval is reproducible.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if v.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_resamples, v.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return mean, float(low), float(high)


def median_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Median and its distribution-free confidence interval: ``(median, low, high)``.

    The interval is the pair of order statistics x_(j), x_(n-j+1) with the largest j such that
    P(j <= B <= n - j) >= ``confidence`` for B ~ Binomial(n, 1/2) (the sign-test interval; its
    coverage is at least ``confidence``).  For latencies, whose spread is skewed, where a mean's
    bootstrap would be pulled by the tail.  With too few values for the confidence (n < 6 at 95 %)
    the interval is the sample's range, which then covers less than asked.
    """
    v = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    v = v[~np.isnan(v)]
    n = v.size
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    pmf = [math.comb(n, i) / 2.0 ** n for i in range(n + 1)]
    j = 1
    while j + 1 <= n - j and sum(pmf[j + 1:n - j]) >= confidence:  # B in [j+1, n-j-1] still covers
        j += 1
    return float(np.median(v)), float(v[j - 1]), float(v[n - j])
