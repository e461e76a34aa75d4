"""Routing experiment: learned routers against fixed policies on a real tier x query outcome matrix.

``run`` composes three modules:

1. ``outcomes`` -- every tier answers every query once (greedy, short ``max_tokens``), cached
   under ``<system.cache_dir>/outcomes``; correctness by the strict ``workloads.is_correct``.
2. ``routing_sim`` -- for every feedback mode (``bandit``: only the served tier's outcome is seen;
   ``full``: RouteLLM's offline setting, every tier's outcome; both through the server's
   ``LearningService`` path) and every seed (a seed permutes the arrival order and seeds the routers),
   each router routes the queries online, test-then-train.
3. ``routing_report`` -- per-seed metrics, then mean and 95 % bootstrap CI over seeds for every
   metric: operating point with and without the confidence fallback, RouteLLM's APGR / CPT on
   the normalised-cost axis (n/a for fixed policies), cost reduction at matched quality.

Defaults follow what a result needs to mean something: all tiers of the profile, >= 200
distinct queries (``workloads.generate(..., distinct=True)``: a repeated query would let a
memory-based router look its label up), five seeds.  A smaller run still runs, says so and
tags its MLflow run ``underpowered``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from .. import models
from ..config import Config
from ..workloads import FAMILIES, WorkItem, generate
from . import routing_report as report
from .outcomes import (SYSTEM_PROMPT, OutcomeMatrix, collect_outcomes, default_cache_dir, judge_correct,  # noqa: F401
                       make_pool)
from .progress import step_progress
from .routing_sim import FEEDBACK_MODES, build_inputs, is_fixed_policy, simulate, threshold_curve  # noqa: F401
from .tracking import NullTracker, Tracker, log_experiment, mark_underpowered

DEFAULT_ROUTERS = ("fastgrnn", "knn", "logreg", "random", "always-smallest", "always-largest", "oracle")
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
DEFAULT_N_QUERIES = 300
TARGET_QUALITY_GAP = 0.03  # issue 12: quality >= always-largest - 0.03 (reported beside the static bounds)
_make_pool = make_pool  # the name other experiments import


def make_embedder(config: Config, pool: Any = None):
    """The query embedder of ``config.embedding``.  ``llm-encoder`` (the server profiles) embeds
    with an LLM tier's hidden states, so it gets ``pool`` or a lazily loading pool of just its
    encoder tier (nothing loads until the first text is embedded)."""
    from ..embedding import EmbeddingService
    if config.embedding.model == "llm-encoder" and pool is None:
        encoder = config.embedding.encoder_tier or min(config.inference.models,
                                                      key=lambda t: models.resolve(t).params_m)
        pool = make_pool(config, [encoder])
    return EmbeddingService(config.embedding, pool=pool)


@dataclass
class RoutingResult:
    summary: pd.DataFrame  # one row per (feedback, router): mean and _lo/_hi 95 % CI of every metric
    per_seed: pd.DataFrame  # one row per (feedback, seed, router)
    curves: pd.DataFrame  # feedback, seed, router, tau, cost, norm_cost, quality, largest_share
    decisions: pd.DataFrame  # one row per (feedback, seed, router, query)
    tiers: pd.DataFrame  # each tier alone: quality, cost, latency, per-family quality
    outcomes: OutcomeMatrix
    underpowered: list[str] = field(default_factory=list)  # why the run is below its meaningful size
    figures: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def to_markdown(self, feedback: str | None = None) -> str:
        return report.markdown(self.summary, feedback)


def _feedback_modes(feedback: str | Sequence[str]) -> list[str]:
    modes = [feedback] if isinstance(feedback, str) else list(feedback)
    bad = [m for m in modes if m not in FEEDBACK_MODES]
    if bad or not modes:
        raise ValueError(f"feedback must be one or more of {FEEDBACK_MODES}, got {feedback!r}")
    return modes


def _learning_service(config: Config, router: Any, seed: int):
    """The server's learning path around ``router`` (no memory, nothing written to disk); the
    seed drives its exploration and replay sampling."""
    from ..learning.service import LearningService
    return LearningService(config.with_overrides({"system.seed": seed}), router, resume=False, persist=False)


def run(config: Config, workload: Sequence[WorkItem] | None = None, routers: Sequence[str] = DEFAULT_ROUTERS, *,
        tiers: Sequence[str] | None = None, seeds: Sequence[int] = DEFAULT_SEEDS,
        feedback: str | Sequence[str] = "bandit", max_tokens: int = 16, cache_dir: str | os.PathLike | None = None,
        update_every: int = 8, unsolved: str = "smallest", min_queries: int = 30, min_seeds: int = 5, min_updates: int = 4, pool: Any = None, embedder: Any = None,
        tracker: Tracker | None = None, progress: Callable[[str, int, int], None] | None = None,
        show_progress: bool = True) -> RoutingResult:
    """The routing experiment (module docstring).

    ``workload`` defaults to ``DEFAULT_N_QUERIES`` distinct generated queries (workload seed 0);
    ``tiers`` to ``config.inference.models``.  Learned routers learn through ``LearningService``
    (the serving path) in both feedback modes.  ``min_*``: the minimum-size guard.

    Logs to ``tracker``: the resolved config and parameters; ``<feedback>/<router>/<metric>`` (mean)
    with ``_ci_low``/``_ci_high``; tables (summary, per-seed, curves, decisions, tiers, outcomes) and
    the figures ``cost_quality.png`` and ``online_quality.png``; the tag ``underpowered`` when the
    run is below its meaningful size.
    """
    from ..router import make_router

    tracker = tracker or NullTracker()
    tiers = list(tiers or config.inference.models)
    if len(tiers) < 2:
        raise ValueError(f"routing needs at least two tiers to choose from, got {tiers}; "
                         "set inference.models or pass tiers=[...]")
    if unsolved not in ("smallest", "largest"):
        raise ValueError(f"unsolved must be 'smallest' or 'largest', got {unsolved!r}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {seeds!r}")
    modes = _feedback_modes(feedback)
    items = list(workload) if workload is not None else generate(FAMILIES, DEFAULT_N_QUERIES, 0, distinct=True)
    if not items:
        raise ValueError("the routing workload is empty")
    params = {"experiment": "routing", "n_queries": len(items), "tiers": ",".join(tiers), "routers": ",".join(routers),
              "max_tokens": max_tokens, "update_every": update_every, "seeds": seeds, "feedback": ",".join(modes),
              "unsolved": unsolved,
              "distinct_queries": len({it.query for it in items})}
    log_experiment(tracker, config, params)  # experiment values replace the config values they override

    outcomes = collect_outcomes(config, items, tiers, max_tokens=max_tokens, cache_dir=cache_dir, pool=pool,
                                progress=progress)
    embedder = embedder or make_embedder(config, pool)
    vectors = np.asarray(embedder.embed([it.query for it in items]), np.float32)
    token_counts = np.array([embedder.count_tokens(it.query) for it in items])
    c_weak, c_strong = float(outcomes.cost[:, 0].mean()), float(outcomes.cost[:, -1].mean())

    runs = [(mode, seed, name) for mode in modes for seed in seeds for name in routers]
    bar = step_progress(len(runs), show_progress, "routing runs")
    per_seed, curves, decisions = [], [], []
    for mode, seed, name in runs:
        order = np.random.default_rng(seed).permutation(len(items))  # the seed's arrival order
        seen = outcomes.subset(order)
        inputs = build_inputs(seen.items, vectors[order], token_counts[order], tiers, None, max_tokens=max_tokens,
                              similarity_threshold=config.memory.similar_edge_min_score)
        router = make_router(name, tiers, config.router, input_dim=vectors.shape[1], seed=seed)
        service = None
        if name != "oracle" and not is_fixed_policy(name):
            service = _learning_service(config, router, seed)
        trace = simulate(router, inputs, seen, feedback=mode, update_every=update_every, unsolved=unsolved,
                         learning_service=service)
        curve = threshold_curve(trace.probs, seen.correct, seen.cost)
        curve["norm_cost"] = (curve["cost"] - c_weak) / (c_strong - c_weak) if c_strong > c_weak else np.nan
        curve.insert(0, "router", name)
        curve.insert(0, "seed", seed)
        curve.insert(0, "feedback", mode)
        curves.append(curve)
        per_seed.append({"feedback": mode, "seed": seed, **report.summarise(trace, seen, curve, unsolved)})
        decisions.append(report.decisions_frame(trace, seen, mode, seed, unsolved))
        bar(f"{mode} seed {seed} {name}")

    per_seed_df = pd.DataFrame(per_seed)
    result = RoutingResult(summary=report.aggregate(per_seed_df), per_seed=per_seed_df,
                           curves=pd.concat(curves, ignore_index=True),
                           decisions=pd.concat(decisions, ignore_index=True), tiers=outcomes.tier_table(),
                           outcomes=outcomes, params=params)
    result.underpowered = report.underpowered_reasons(outcomes, seeds, per_seed_df, min_queries=min_queries,
                                                      min_seeds=min_seeds, min_updates=min_updates)
    mark_underpowered(tracker, result.underpowered, "routing")
    result.figures = {"cost_quality": report.plot_cost_quality(result),
                      "online_quality": report.plot_online_quality(result)}
    report.log_result(tracker, result)
    return result


def validation_workload(n: int, seed: int, exclude_seed: int | None = None) -> list[WorkItem]:
    """``n`` distinct generated queries of workload ``seed``, less any that also occur among workload
    ``exclude_seed``'s ``n`` (the generator reuses templates and facts, so two seeds overlap)."""
    items = generate(FAMILIES, n, seed, distinct=True)
    if exclude_seed is None:
        return items
    if exclude_seed == seed:
        raise ValueError("--exclude-workload-seed must differ from --workload-seed")
    taken = {it.query for it in generate(FAMILIES, n, exclude_seed, distinct=True)}
    return [it for it in items if it.query not in taken]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ruvllm_lab.experiments.routing``: run the experiment, log to MLflow, print the tables."""
    import argparse

    from .tracking import MLflowTracker, readable_run_name

    p = argparse.ArgumentParser(description="Routing experiment (bandit and/or full feedback) into MLflow.")
    p.add_argument("--config", default="configs/server-cpu.toml")
    p.add_argument("--n", type=int, default=DEFAULT_N_QUERIES, help="distinct generated queries")
    p.add_argument("--workload-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    p.add_argument("--feedback", nargs="+", default=["bandit", "full"], choices=FEEDBACK_MODES)
    p.add_argument("--routers", nargs="+", default=list(DEFAULT_ROUTERS))
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--update-every", type=int, default=8)
    p.add_argument("--experiment", default="ruvllm-routing")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set router.cost_penalty=0.2")
    p.add_argument("--exclude-workload-seed", type=int, default=None, metavar="S",
                   help="drop queries that also occur in workload seed S's --n queries: a validation workload "
                        "disjoint from the reported one (tune on it, report on S)")
    args = p.parse_args(argv)
    config = Config.load(args.config, overrides=args.set)
    items = validation_workload(args.n, args.workload_seed, args.exclude_workload_seed)
    name = readable_run_name("routing", n_queries=len(items), seeds=len(args.seeds), feedback="+".join(args.feedback))
    tags = {"entry": "experiments.routing", "workload_seed": str(args.workload_seed)}
    if args.exclude_workload_seed is not None:
        tags["validation_excludes_workload_seed"] = str(args.exclude_workload_seed)
    with MLflowTracker(experiment=args.experiment, run_name=name, tags=tags) as tracker:
        result = run(config, items, args.routers, seeds=args.seeds, feedback=args.feedback,
                     max_tokens=args.max_tokens, update_every=args.update_every, tracker=tracker)
        print(f"\nMLflow run {tracker.run_id} ({tracker.artifact_uri})")
    print(f"\n{len(items)} queries, tiers {', '.join(result.outcomes.tiers)}, seeds {args.seeds}\n")
    print(result.tiers.round(3).to_markdown(index=False))
    out = result.outcomes
    print("\nheadroom:", {k: round(v, 3) for k, v in out.headroom().items()})
    target = float(out.correct[:, -1].mean()) - TARGET_QUALITY_GAP
    for name, groups in (("family", [it.family for it in out.items]),
                         ("family x difficulty", [f"{it.family}/{it.difficulty}" for it in out.items])):
        bound = out.static_policy_bound(groups, target)
        print(f"best static policy per {name} at quality >= {target:.3f} (evaluation only):",
              {k: (round(v, 3) if isinstance(v, float) else v) for k, v in bound.items()} or "none")
    mono = out.monotonicity()
    print(f"queries where a cheaper tier is right and a larger one wrong: {mono['violated_share']:.3f}; "
          + "; ".join(f"P({k}) = {v:.2f}" for k, v in mono["pairs"].items()))
    for mode in args.feedback:
        print(f"\n{mode} feedback\n" + result.to_markdown(mode))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
