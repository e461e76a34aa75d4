"""Routing report: per-seed metrics of one router trace, their mean and 95 % bootstrap CI over
seeds, the markdown table, the figures and the MLflow logging.

Metric definitions (one row per feedback mode, seed and router):

* ``quality`` / ``cost`` / ``latency_ms`` / ``cost_reduction``: the operating point as served --
  the router's decision *with* the confidence fallback (and, in bandit mode, its exploration);
  cost is parameter-weighted tokens, ``cost_reduction = 1 - cost / cost(always-largest)``.
* ``quality_nofb`` / ``cost_nofb`` / ``cost_reduction_nofb``: the router's own most probable
  tier (argmax of its tier distribution: no fallback, no exploration), scored on the outcome
  matrix.  The gap to the served point is what the fallback adds.
* ``apgr``, ``cpt50``, ``cpt80``: RouteLLM's metrics (``metrics``) on the threshold curve
  (``routing_sim.threshold_curve``), x-axis the normalised cost (``metrics`` says how this
  differs from RouteLLM's share of strong-model calls).  ``nan`` (shown "n/a") for fixed
  policies (always-*, random) and for a router whose tier distribution never varies across
  queries (e.g. a classifier that got no usable label under bandit feedback): their "curve" is a
  chord by construction.
* ``cost_reduction_matched``: cost reduction at the first point of the curve that reaches
  always-largest's quality (``nan`` if it never does).
* ``largest_share``: share of queries served by the largest tier; ``share/<tier>`` per tier.
* ``oracle_agreement``: share of queries routed to the cheapest correct tier.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from . import metrics as M
from .outcomes import OutcomeMatrix
from .routing_sim import RouterTrace, is_fixed_policy

METRICS = ("quality", "cost", "latency_ms", "cost_reduction", "quality_nofb", "cost_nofb", "cost_reduction_nofb",
           "apgr", "cpt50", "cpt80", "cost_reduction_matched", "largest_share", "oracle_agreement",
           "fallback_rate", "explored_rate")

TABLE_COLUMNS = [("quality", "quality"), ("cost", "cost"), ("cost_reduction", "cost reduction"),
                 ("quality_nofb", "quality, no fallback"), ("cost_reduction_nofb", "cost reduction, no fallback"),
                 ("apgr", "APGR"), ("cpt50", "CPT(50 %)"), ("cost_reduction_matched", "cost reduction at matched quality"),
                 ("largest_share", "share to largest"), ("oracle_agreement", "oracle agreement")]


def summarise(trace: RouterTrace, outcomes: OutcomeMatrix, curve: pd.DataFrame, unsolved: str = "smallest") -> dict:
    """One per-seed summary row (module docstring)."""
    correct, cost, lat = outcomes.correct, outcomes.cost, outcomes.latency_ms
    labels = outcomes.labels(unsolved)
    q_idx = np.arange(len(trace.chosen))
    q_weak, q_strong = float(correct[:, 0].mean()), float(correct[:, -1].mean())
    c_weak, c_strong = float(cost[:, 0].mean()), float(cost[:, -1].mean())
    served_cost = float(cost[q_idx, trace.chosen].mean())
    policy_cost = float(cost[q_idx, trace.policy].mean())
    row = {
        "router": trace.name,
        "quality": float(correct[q_idx, trace.chosen].mean()),
        "cost": served_cost,
        "latency_ms": float(lat[q_idx, trace.chosen].mean()),
        "cost_reduction": M.cost_reduction(served_cost, c_strong),
        "quality_nofb": float(correct[q_idx, trace.policy].mean()),
        "cost_nofb": policy_cost,
        "cost_reduction_nofb": M.cost_reduction(policy_cost, c_strong),
        "largest_share": float((trace.chosen == len(outcomes.tiers) - 1).mean()),
        "oracle_agreement": float((trace.chosen == labels).mean()),
        "fallback_rate": float(trace.fallback.mean()),
        "explored_rate": float(trace.explored.mean()),
        "updates": trace.updates,
        "observed": trace.observed,
        "route_ms": float(trace.route_ms.mean()),
        "fit_ms": trace.fit_ms,
    }
    # A router whose tier distribution is the same for every query (a fixed policy, or a learned router
    # that never got a label it could use) has no score to threshold: its "curve" is a chord.
    scores_vary = bool(np.ptp(trace.probs, axis=0).max() > 1e-9) if len(trace.probs) else False
    if (c_strong > c_weak and q_strong != q_weak and scores_vary and not is_fixed_policy(trace.name)
            and len(curve) > 1):
        norm = M.normalised_cost(curve["cost"].to_numpy(), c_weak, c_strong)
        row["apgr"] = M.apgr(norm, curve["quality"], q_weak, q_strong)
        row["cpt50"] = M.cpt(norm, curve["quality"], q_weak, q_strong, 50)
        row["cpt80"] = M.cpt(norm, curve["quality"], q_weak, q_strong, 80)
        row["cost_reduction_matched"] = M.cost_reduction_at_matched_quality(curve["cost"], curve["quality"],
                                                                              q_strong, c_strong)
    else:
        row.update(apgr=math.nan, cpt50=math.nan, cpt80=math.nan, cost_reduction_matched=math.nan)
    for j, tier in enumerate(outcomes.tiers):
        row[f"share/{tier}"] = float((trace.chosen == j).mean())
    return row


def aggregate(per_seed: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Mean and bootstrap CI over seeds of every metric, per (feedback, router), in router order."""
    rows = []
    share_cols = [c for c in per_seed.columns if c.startswith("share/")]
    for (feedback, router), g in per_seed.groupby(["feedback", "router"], sort=False):
        row: dict[str, Any] = {"feedback": feedback, "router": router, "seeds": int(g["seed"].nunique())}
        for m in (*METRICS, *share_cols):
            mean, lo, hi = M.bootstrap_ci(g[m].to_numpy(dtype=float), confidence)
            row[m], row[f"{m}_lo"], row[f"{m}_hi"] = mean, lo, hi
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(mean: float, lo: float, hi: float, pct: bool = False) -> str:
    if math.isnan(mean):
        return "n/a"
    f = (lambda v: f"{100 * v:.1f} %") if pct else (lambda v: f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}")
    if lo == hi:
        return f(mean)
    return f"{f(mean)} [{f(lo)}, {f(hi)}]"


def markdown(summary: pd.DataFrame, feedback: str | None = None) -> str:
    """The summary as a markdown table: ``mean [95 % CI]`` per cell, ``n/a`` where a metric is undefined."""
    df = summary if feedback is None else summary[summary["feedback"] == feedback]
    pct = {"cost_reduction", "cost_reduction_nofb", "cost_reduction_matched", "largest_share"}
    head = ["feedback", "router"] + [label for _, label in TABLE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in df.to_dict("records"):
        cells = [row["feedback"], row["router"]] + [_cell(row[m], row[f"{m}_lo"], row[f"{m}_hi"], m in pct)
                                                    for m, _ in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _metric_key(column: str) -> str:
    for suffix, name in (("_lo", "_ci_low"), ("_hi", "_ci_high")):
        if column.endswith(suffix):
            return column[: -len(suffix)] + name
    return column


def log_result(tracker: Any, result: Any) -> None:
    """Metrics ``<feedback>/<router>/<metric>`` (mean) with ``_ci_low``/``_ci_high``; tables and figures."""
    for row in result.summary.to_dict("records"):
        prefix = f"{row['feedback']}/{row['router']}"
        tracker.log_metrics({f"{prefix}/{_metric_key(k)}": v for k, v in row.items()
                             if k not in ("feedback", "router") and _is_number(v)})
    for row in result.tiers.to_dict("records"):
        tracker.log_metrics({f"tier/{row['tier']}/{k}": v for k, v in row.items() if k != "tier" and _is_number(v)})
    tracker.log_metrics({"outcomes/generated": result.outcomes.generated,
                         "outcomes/queries": len(result.outcomes.items), **{f"headroom/{k}": v for k, v in
                                                                            result.outcomes.headroom().items()}})
    tracker.log_table(result.summary, "routing_summary.csv")
    tracker.log_table(result.per_seed, "routing_per_seed.csv")
    tracker.log_table(result.curves, "routing_curves.csv")
    tracker.log_table(result.decisions, "routing_decisions.csv")
    tracker.log_table(result.tiers, "routing_tiers.csv")
    tracker.log_table(result.outcomes.frame(), "routing_outcomes.csv")
    tracker.log_text(result.to_markdown(), "routing_summary.md")
    for name, fig in result.figures.items():
        tracker.log_figure(fig, f"{name}.png")


def plot_cost_quality(result: Any, feedback: str | None = None, seed: int | None = None):
    """Normalised cost (0 = always-smallest, 1 = always-largest) against quality, one line per router
    (curves of one seed; the served operating points as large dots)."""
    import matplotlib.pyplot as plt

    out = result.outcomes
    feedback = feedback or result.params["feedback"].split(",")[0]
    seed = result.params["seeds"][0] if seed is None else seed
    c_weak, c_strong = float(out.cost[:, 0].mean()), float(out.cost[:, -1].mean())
    span = (c_strong - c_weak) or 1.0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = result.curves[(result.curves["feedback"] == feedback) & (result.curves["seed"] == seed)]
    points = result.per_seed[(result.per_seed["feedback"] == feedback) & (result.per_seed["seed"] == seed)]
    shapes = "os^vD<>pP*Xh"  # a shape per router, hollow: coinciding operating points stay visible
    for k, (name, curve) in enumerate(curves.groupby("router", sort=False)):
        c = curve.sort_values(["cost", "quality"])
        line, = ax.plot((c["cost"] - c_weak) / span, c["quality"], marker=shapes[k % len(shapes)], ms=3, lw=1.2,
                        label=name)
        row = points.set_index("router").loc[name]
        ax.scatter([(row["cost"] - c_weak) / span], [row["quality"]], marker=shapes[k % len(shapes)],
                   s=max(40, 150 - 15 * k), facecolors="none", edgecolors=line.get_color(), linewidths=1.6, zorder=5)
    ax.scatter([], [], marker="o", s=90, facecolors="none", edgecolors="black", linewidths=1.6,
               label="large hollow marker: the router's operating point as served")
    oc, oq = M.optimal_curve(out.correct, out.cost.mean(axis=0))
    ax.plot((oc - c_weak) / span, oq, ls=":", color="black", label="optimal (oracle budget)")
    ax.axhline(out.correct[:, 0].mean(), ls="--", color="grey", lw=0.8, label=f"{out.tiers[0]} alone")
    ax.axhline(out.correct[:, -1].mean(), ls="--", color="red", lw=0.8, label=f"{out.tiers[-1]} alone")
    ax.set_xlabel("normalised cost: parameter-weighted tokens, 0 = always-smallest, 1 = always-largest")
    ax.set_ylabel("quality (strict gold accuracy)")
    ax.set_title(f"{feedback} feedback, seed {seed}: {len(out.items)} queries, tiers {', '.join(out.tiers)}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)  # returned, shown once by whoever displays it
    return fig


def plot_online_quality(result: Any, window: int = 20):
    """Rolling served quality per (feedback, router) over arrival order, first seed."""
    import matplotlib.pyplot as plt

    seed = result.params["seeds"][0]
    d0 = result.decisions[result.decisions["seed"] == seed]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for (feedback, name), d in d0.groupby(["feedback", "router"], sort=False):
        ax.plot(d["step"], d["correct"].astype(float).rolling(window, min_periods=1).mean(),
                label=f"{name} ({feedback})", lw=1, ls="-" if feedback == "bandit" else "--")
    ax.set_xlabel("query (arrival order)")
    ax.set_ylabel(f"served quality, rolling {window}")
    ax.set_title(f"Online served quality per router (seed {seed}; solid: bandit, dashed: full feedback)",
                 fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)  # returned, shown once by whoever displays it
    return fig


def decisions_frame(trace: RouterTrace, outcomes: OutcomeMatrix, feedback: str, seed: int,
                    unsolved: str = "smallest") -> pd.DataFrame:
    tiers = outcomes.tiers
    labels = outcomes.labels(unsolved)
    q_idx = np.arange(len(outcomes.items))
    return pd.DataFrame({
        "feedback": feedback, "seed": seed, "router": trace.name, "step": q_idx,
        "family": [it.family for it in outcomes.items], "difficulty": [it.difficulty for it in outcomes.items],
        "tier": [tiers[c] for c in trace.chosen], "policy_tier": [tiers[c] for c in trace.policy],
        "oracle_tier": [tiers[c] for c in labels], "correct": outcomes.correct[q_idx, trace.chosen],
        "cost": outcomes.cost[q_idx, trace.chosen], "latency_ms": outcomes.latency_ms[q_idx, trace.chosen],
        "fallback": trace.fallback, "explored": trace.explored, "propensity": trace.propensity})


def underpowered_reasons(outcomes: OutcomeMatrix, seeds: Sequence[int], per_seed: pd.DataFrame, *,
                         min_queries: int, min_seeds: int, min_updates: int) -> list[str]:
    """Why a run is below its meaningful size (empty list: it is not)."""
    reasons = []
    n = len(outcomes.items)
    if n < min_queries:
        reasons.append(f"{n} queries per seed < {min_queries}")
    repeated = n - len({it.query for it in outcomes.items})
    if repeated:
        reasons.append(f"{repeated} repeated queries: a memory-based router can look their labels up "
                       "(generate the workload with distinct=True)")
    if len(seeds) < min_seeds:
        reasons.append(f"{len(seeds)} seed(s) < {min_seeds}: the 95 % CI is not meaningful")
    acc = outcomes.correct.mean(axis=0)
    gap_queries = abs(acc[-1] - acc[0]) * n
    if gap_queries < 2:
        reasons.append(f"tied tiers: {outcomes.tiers[0]} and {outcomes.tiers[-1]} differ on {gap_queries:.0f} "
                       "quer(ies), so PGR/APGR/CPT divide by ~0")
    learned = per_seed[~per_seed["router"].map(is_fixed_policy) & (per_seed["router"] != "oracle")]
    if len(learned) and int(learned["updates"].min()) < min_updates:
        reasons.append(f"a learned router made {int(learned['updates'].min())} learning update(s) < {min_updates}")
    return reasons
