"""Forgetting experiment: the FastGRNN router learns phases of a shifting workload in turn.

Every method trains through ``learning.trainer.ContinualTrainer`` -- the code path the server's
``LearningService`` runs -- with the same number of optimiser steps per phase.  After each phase
(and every ``eval_every`` updates) the router is evaluated on the held-out test split of *every*
phase, filling the accuracy matrix ``A[i, j]`` (after training phase i, on phase j).

Metrics (``learning.metrics``), after the last phase T-1:

* **forgetting** F = mean over past phases j < T-1 of ``A[j, j] - A[T-1, j]``: Avalanche's
  ``StreamForgetting`` (accuracy right after training on an experience minus accuracy at the end,
  averaged over the experiences trained before the last; the current one is excluded, as in
  Avalanche where it has no "last" value yet).  ``F_j`` per phase is ``ExperienceForgetting``.
* **backward transfer** BWT = -F: Avalanche's ``forgetting_to_bwt`` (BWT = -1 x forgetting).
* **average accuracy** ACC = mean_j A[T-1, j].
* F is reported with the number of updates it was measured over (``updates_window``: optimiser
  steps from the end of phase 0 to the end of the run; ``updates_after_phase_j`` per phase).  It
  is never scaled to another number of updates.

Methods (rows):

* ``naive`` -- replay off, EWC off.
* ``ewc`` -- EWC with gamma = 1: the per-sample Fisher of the label log-likelihood after each
  phase is *accumulated* (F <- F + F_new) and the anchor moves to the latest weights.  Kirkpatrick
  et al. (2017) keep one anchor per task instead; with one anchor the penalty is the online form
  of Schwarz et al. (2018) / Huszar (2018) at gamma = 1.
* ``online-ewc`` -- online EWC, F <- gamma F + F_new with gamma = ``learning.ewc_gamma``
  (the row is named with its gamma).
* ``replay`` -- each step mixes ``learning.replay_ratio`` replayed rows into the batch; the buffer
  keeps ``replay_fraction`` (10-25 %) of each past phase's training rows.
* ``online-ewc+replay`` -- both.
* ``full-rehearsal`` -- replay of *every* past training row: the upper bound replay approaches.

Labels (the router's target tier per query):

* ``labels="outcomes"`` (default): the cheapest correct tier in the real tier x query outcome
  matrix (``outcomes.collect_outcomes``, cached; the smallest tier when no tier is correct).
  The phases are the default routing workload split by family, so the routing experiment's
  cached outcomes serve both.
* ``labels="synthetic-rule"``: no LLM, a fixed rule -- harder queries and families need larger
  tiers: ``tier = round(clip((difficulty - 1 + FAMILY_SHIFT[family]) / 2, 0, 1) * (T - 1))``.

A seed draws the train/test split of each phase and initialises the router; the summary is the
mean and 95 % bootstrap CI over seeds.  Accuracy is the router's serving rule against the label,
on test items it never trained on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..config import Config
from ..workloads import FAMILIES, Phase, WorkItem, generate, phases_by_family
from . import metrics as M
from .progress import step_progress
from .tracking import NullTracker, Tracker, log_experiment, mark_underpowered

METHODS = ("naive", "ewc", "online-ewc", "replay", "online-ewc+replay", "full-rehearsal")
LABELS = ("outcomes", "synthetic-rule")
FAMILY_SHIFT = {"arithmetic": 1, "units": 1, "date": 1, "string": 0, "factual": -1}
DEFAULT_FAMILY_PHASES = (("arithmetic",), ("units", "string"), ("date", "factual"))
DEFAULT_POOL_SIZE = 300


def synthetic_label(item: WorkItem, n_tiers: int) -> int:
    """The synthetic rule of the module docstring (unknown families shift by 0)."""
    rank = (item.difficulty - 1 + FAMILY_SHIFT.get(item.family, 0)) / 2.0
    return int(round(min(max(rank, 0.0), 1.0) * (n_tiers - 1)))


def default_schedule(pool_size: int = DEFAULT_POOL_SIZE, seed: int = 0) -> list[Phase]:
    """The routing workload (``pool_size`` distinct queries) split into ``DEFAULT_FAMILY_PHASES``."""
    return phases_by_family(generate(FAMILIES, pool_size, seed, distinct=True), DEFAULT_FAMILY_PHASES)


@dataclass(frozen=True)
class Method:
    label: str  # as shown in the table (names its gamma and replay share)
    key: str  # one of METHODS: the ``method`` column and the MLflow metric prefix
    replay_ratio: float
    ewc_lambda: float
    ewc_gamma: float
    replay_fraction: float  # share of each past phase's training rows kept for replay


def methods_for(config: Config, names: Sequence[str], ewc_lambda: float, replay_fraction: float) -> list[Method]:
    lc = config.learning
    table = {
        "naive": Method("naive", "naive", 0.0, 0.0, 1.0, 0.0),
        "ewc": Method("EWC (gamma = 1)", "ewc", 0.0, ewc_lambda, 1.0, 0.0),
        "online-ewc": Method(f"online EWC (gamma = {lc.ewc_gamma:g})", "online-ewc", 0.0, ewc_lambda, lc.ewc_gamma, 0.0),
        "replay": Method(f"replay ({replay_fraction:.0%} of past data)", "replay", lc.replay_ratio, 0.0, 1.0,
                         replay_fraction),
        "online-ewc+replay": Method(f"online EWC (gamma = {lc.ewc_gamma:g}) + replay ({replay_fraction:.0%})",
                                    "online-ewc+replay", lc.replay_ratio, ewc_lambda, lc.ewc_gamma, replay_fraction),
        "full-rehearsal": Method("full rehearsal (upper bound)", "full-rehearsal", lc.replay_ratio, 0.0, 1.0, 1.0),
    }
    unknown = [m for m in names if m not in table]
    if unknown:
        raise ValueError(f"unknown forgetting method(s) {unknown}; known: {', '.join(METHODS)}")
    return [table[m] for m in names]


@dataclass
class ForgettingResult:
    summary: pd.DataFrame  # one row per method (key, label): mean and _lo/_hi 95 % CI over seeds
    per_seed: pd.DataFrame  # one row per (seed, method)
    matrices: dict[str, pd.DataFrame]  # method key -> accuracy matrix of the first seed
    timeline: pd.DataFrame  # seed, method, update, phase (trained so far), eval_phase, accuracy
    phases: list[Phase]
    underpowered: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def to_markdown(self) -> str:
        cols = [("average_accuracy", "average accuracy"), ("forgetting", "forgetting F"),
                ("backward_transfer", "BWT")]
        head = ["method"] + [c for _, c in cols] + ["updates (window)", "seeds"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.summary.to_dict("records"):
            cells = [row["label"]]
            for m, _ in cols:
                cells.append(f"{row[m]:.3f} [{row[m + '_lo']:.3f}, {row[m + '_hi']:.3f}]"
                             if row[m + "_lo"] != row[m + "_hi"] else f"{row[m]:.3f}")
            cells += [f"{int(row['updates_window'])}", str(int(row["seeds"]))]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _labels(config: Config, items: list[WorkItem], tiers: list[str], labels: str, max_tokens: int,
            cache_dir: Any) -> tuple[np.ndarray, Any]:
    if labels == "synthetic-rule":
        return np.array([synthetic_label(it, len(tiers)) for it in items]), None
    from .outcomes import collect_outcomes
    outcomes = collect_outcomes(config, items, tiers, max_tokens=max_tokens, cache_dir=cache_dir)
    return outcomes.labels("smallest"), outcomes


def run(config: Config, schedule: Sequence[Phase] | None = None, methods: Sequence[str] = METHODS, *,
        seeds: Sequence[int] = (0, 1, 2, 3, 4), labels: str = "outcomes", tiers: Sequence[str] | None = None,
        ewc_lambda: float | None = None, replay_fraction: float = 0.2, steps_per_phase: int = 200,
        test_fraction: float = 0.4, eval_every: int | None = None, max_tokens: int = 16, cache_dir: Any = None,
        min_test_per_phase: int = 30, min_seeds: int = 5, min_updates: int = 100, embedder: Any = None,
        tracker: Tracker | None = None, show_progress: bool = True) -> ForgettingResult:
    """Run every method over ``schedule`` (default: ``default_schedule()``) for every seed.

    ``ewc_lambda`` defaults to ``learning.ewc_lambda``; replay mixing, EWC gamma, batch size and
    learning rate come from ``config.learning``.  ``min_*``: the minimum-size guard (a smaller run
    says so and is tagged ``underpowered``).  Logs per method ``<method>/<metric>`` (mean) with
    ``_ci_low``/``_ci_high``, per-seed tables, the first seed's matrices, and the figures
    ``accuracy_over_time.png`` and ``forgetting_summary.png``.
    """
    from ..learning.metrics import AccuracyMatrix, continual_report, forgetting_per_phase
    from ..learning.trainer import ContinualTrainer
    from ..router import RouterExample, make_router
    from ..router.train import accuracy
    from .routing import make_embedder
    from .routing_sim import build_inputs

    tracker = tracker or NullTracker()
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not 0.0 < replay_fraction <= 1.0:
        raise ValueError(f"replay_fraction must be in (0, 1], got {replay_fraction}")
    if steps_per_phase < 1:
        raise ValueError(f"steps_per_phase must be >= 1, got {steps_per_phase}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("give at least one seed")
    lam = config.learning.ewc_lambda if ewc_lambda is None else float(ewc_lambda)
    specs = methods_for(config, methods, lam, replay_fraction)
    phases = list(schedule) if schedule is not None else default_schedule()
    if len(phases) < 2:
        raise ValueError("a forgetting run needs at least two phases")
    tiers = list(tiers or config.inference.models)
    if len(tiers) < 2:
        raise ValueError(f"the router needs at least two tiers to choose from, got {tiers}")

    params = {"experiment": "forgetting", "methods": ",".join(methods), "phases": len(phases),
              "phase_sizes": ",".join(str(len(p.items)) for p in phases), "mixes": "; ".join(p.name for p in phases),
              "tiers": ",".join(tiers), "labels": labels, "ewc_lambda": lam, "ewc_gamma": config.learning.ewc_gamma,
              "replay_ratio": config.learning.replay_ratio, "replay_fraction": replay_fraction,
              "steps_per_phase": steps_per_phase, "test_fraction": test_fraction, "seeds": seeds,
              "max_tokens": max_tokens}  # the outcome labels' generation length (logged as inference.max_tokens)
    log_experiment(tracker, config, params)

    all_items = [it for p in phases for it in p.items]
    y, _ = _labels(config, all_items, tiers, labels, max_tokens, cache_dir)
    embedder = embedder or make_embedder(config)
    vectors = np.asarray(embedder.embed([it.query for it in all_items]), np.float32)
    counts = [embedder.count_tokens(it.query) for it in all_items]
    inputs = build_inputs(all_items, vectors, counts, tiers, None, max_tokens=max_tokens,
                          similarity_threshold=config.memory.similar_edge_min_score)
    examples = [RouterExample(x=x, best_tier=tiers[int(t)]) for x, t in zip(inputs, y)]
    bounds = np.cumsum([0] + [len(p.items) for p in phases])
    eval_every = eval_every or max(1, steps_per_phase // 4)

    runs = [(seed, spec) for seed in seeds for spec in specs]
    bar = step_progress(len(runs), show_progress, "forgetting runs")
    rows, matrices, timeline = [], {}, []
    for seed, spec in runs:
        rng = np.random.default_rng(seed)
        train_sets, test_sets = [], []
        for k in range(len(phases)):
            idx = rng.permutation(np.arange(bounds[k], bounds[k + 1]))
            n_test = max(1, int(round(test_fraction * len(idx))))
            if len(idx) - n_test < 1:
                raise ValueError(f"{phases[k].name}: {len(idx)} items leave nothing to train on at "
                                 f"test_fraction={test_fraction}")
            test_sets.append([examples[i] for i in idx[:n_test]])
            train_sets.append([examples[i] for i in idx[n_test:]])
        policy = make_router("fastgrnn", tiers, config.router, input_dim=vectors.shape[1], seed=seed)
        trainer = ContinualTrainer.from_config(config, seed=seed, replay_ratio=spec.replay_ratio,
                                               ewc_lambda=spec.ewc_lambda, ewc_gamma=spec.ewc_gamma,
                                               replay_capacity=max(1, sum(len(t) for t in train_sets)))
        test_batches = [policy.featurise(t) for t in test_sets]
        acc_matrix = AccuracyMatrix(len(phases))
        updates_at_end: list[int] = []
        t0 = time.perf_counter()

        def evaluate(trained_upto: int) -> list[float]:
            accs = [accuracy(policy.model, tb) for tb in test_batches]
            for j, a in enumerate(accs):
                timeline.append({"seed": seed, "method": spec.key, "update": trainer.updates, "phase": trained_upto,
                                 "eval_phase": j, "accuracy": a})
            return accs

        evaluate(-1)
        for k, train in enumerate(train_sets):
            done = 0
            while done < steps_per_phase:  # same number of optimiser steps for every method
                chunk = min(eval_every, steps_per_phase - done)
                trainer.update(policy, train, steps=chunk)
                done += chunk
                if done < steps_per_phase:
                    evaluate(k)
            for j, a in enumerate(evaluate(k)):
                acc_matrix.record(k, j, a)
            updates_at_end.append(trainer.updates)
            trainer.consolidate(policy, train)
            keep = train if spec.replay_fraction >= 1.0 else [
                train[i] for i in rng.choice(len(train), size=max(1, int(round(spec.replay_fraction * len(train)))),
                                             replace=False)]
            if spec.replay_ratio > 0:
                trainer.remember(keep, tiers)
        a = acc_matrix.as_array()
        rep = continual_report(a)
        row = {"seed": seed, "method": spec.key, "label": spec.label, **rep, "updates": trainer.updates,
               "updates_window": updates_at_end[-1] - updates_at_end[0], "replay_rows": len(trainer.replay),
               "train_s": time.perf_counter() - t0}
        for j, f in enumerate(forgetting_per_phase(a)):
            row[f"F_{j}"] = float(f)
            row[f"updates_after_phase_{j}"] = updates_at_end[-1] - updates_at_end[j]
        rows.append(row)
        if seed == seeds[0]:
            matrices[spec.key] = pd.DataFrame(a, index=[f"after_{p.name}" for p in phases],
                                               columns=[f"on_{p.name}" for p in phases])
        bar(f"seed {seed} {spec.key}")

    per_seed = pd.DataFrame(rows)
    summary = _aggregate(per_seed)
    result = ForgettingResult(summary=summary, per_seed=per_seed, matrices=matrices, timeline=pd.DataFrame(timeline),
                              phases=phases, params=params)
    result.underpowered = _underpowered(phases, test_fraction, seeds, per_seed, min_test_per_phase, min_seeds,
                                        min_updates)
    mark_underpowered(tracker, result.underpowered, "forgetting")
    result.figures = {"accuracy_over_time": plot_accuracy_over_time(result),
                      "forgetting_summary": plot_summary(result)}
    for row in summary.to_dict("records"):
        tracker.log_metrics({f"{row['method']}/{_metric_key(k)}": v for k, v in row.items()
                             if k not in ("method", "label") and isinstance(v, (int, float, np.floating))
                             and not isinstance(v, bool)})
    tracker.log_table(summary, "forgetting_summary.csv")
    tracker.log_table(per_seed, "forgetting_per_seed.csv")
    tracker.log_table(result.timeline, "forgetting_timeline.csv")
    for name, m in matrices.items():
        tracker.log_table(m.reset_index(names="trained"), f"accuracy_matrix_{_slug(name)}.csv")
    tracker.log_text(result.to_markdown(), "forgetting_summary.md")
    for name, fig in result.figures.items():
        tracker.log_figure(fig, f"{name}.png")
    return result


def _aggregate(per_seed: pd.DataFrame) -> pd.DataFrame:
    metrics = ["average_accuracy", "forgetting", "forgetting_max", "backward_transfer", "updates_window"]
    metrics += [c for c in per_seed.columns if c.startswith("F_") or c.startswith("updates_after_phase_")]
    rows = []
    for (method, label), g in per_seed.groupby(["method", "label"], sort=False):
        row: dict[str, Any] = {"method": method, "label": label, "seeds": int(g["seed"].nunique())}
        for m in metrics:
            row[m], row[f"{m}_lo"], row[f"{m}_hi"] = M.bootstrap_ci(g[m].to_numpy(dtype=float))
        rows.append(row)
    return pd.DataFrame(rows)


def _underpowered(phases, test_fraction, seeds, per_seed, min_test, min_seeds, min_updates) -> list[str]:
    reasons = []
    small = [p.name for p in phases if round(test_fraction * len(p.items)) < min_test]
    if small:
        reasons.append(f"fewer than {min_test} test items in {', '.join(small)}")
    if len(seeds) < min_seeds:
        reasons.append(f"{len(seeds)} seed(s) < {min_seeds}: the 95 % CI is not meaningful")
    window = int(per_seed["updates_window"].min())
    if window < min_updates:
        reasons.append(f"forgetting measured over {window} updates < {min_updates}")
    return reasons


def _metric_key(column: str) -> str:
    for suffix, name in (("_lo", "_ci_low"), ("_hi", "_ci_high")):
        if column.endswith(suffix):
            return column[: -len(suffix)] + name
    return column


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def plot_accuracy_over_time(result: ForgettingResult):
    """One panel per method (first seed): test accuracy on each phase against updates; dotted lines mark phase ends."""
    import matplotlib.pyplot as plt

    methods = list(result.summary["method"])
    seed = result.per_seed["seed"].iloc[0]
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.2), sharey=True, squeeze=False)
    tl = result.timeline[result.timeline["seed"] == seed]
    for ax, method in zip(axes[0], methods):
        d = tl[tl["method"] == method]
        for j, p in enumerate(result.phases):
            dj = d[d["eval_phase"] == j]
            ax.plot(dj["update"], dj["accuracy"], lw=1.2, label=f"phase {j}")
        ends = d.groupby("phase")["update"].max()
        for k, u in ends.items():
            if k >= 0:
                ax.axvline(u, ls=":", color="grey", lw=0.8)
        ax.set_title(method, fontsize=8)
        ax.set_xlabel("updates (optimiser steps)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("router accuracy (test split)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    plt.close(fig)  # returned, shown once by whoever displays it
    return fig


def plot_summary(result: ForgettingResult):
    """Average accuracy and forgetting per method with 95 % CI over seeds."""
    import matplotlib.pyplot as plt

    s = result.summary
    x = np.arange(len(s))
    fig, ax = plt.subplots(figsize=(8, 3.4))
    for off, m, label in ((-0.2, "average_accuracy", "average accuracy"), (0.2, "forgetting", "forgetting F")):
        err = np.vstack([s[m] - s[f"{m}_lo"], s[f"{m}_hi"] - s[m]])
        ax.bar(x + off, s[m], 0.4, yerr=err, capsize=3, label=label)
    ax.set_xticks(x, s["method"], fontsize=7)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("router accuracy / forgetting F")
    ax.set_title(f"Average accuracy and forgetting per method (mean, 95 % CI over {int(s['seeds'].max())} seed(s))",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    plt.close(fig)  # returned, shown once by whoever displays it
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ruvllm_lab.experiments.forgetting``: run every method, log to MLflow, print the table."""
    import argparse

    from .tracking import MLflowTracker, readable_run_name

    p = argparse.ArgumentParser(description="Forgetting experiment (ContinualTrainer) into MLflow.")
    p.add_argument("--config", default="configs/server-cpu.toml")
    p.add_argument("--labels", default="outcomes", choices=LABELS)
    p.add_argument("--pool", type=int, default=DEFAULT_POOL_SIZE, help="distinct queries split into the phases")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps-per-phase", type=int, default=200)
    p.add_argument("--replay-fraction", type=float, default=0.2)
    p.add_argument("--ewc-lambda", type=float, default=None)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--experiment", default="ruvllm-forgetting")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set router.tier_heads=cumulative")
    args = p.parse_args(argv)
    config = Config.load(args.config, overrides=args.set)
    name = readable_run_name("forgetting", labels=args.labels, seeds=len(args.seeds), steps=args.steps_per_phase)
    with MLflowTracker(experiment=args.experiment, run_name=name, tags={"entry": "experiments.forgetting"}) as tracker:
        result = run(config, default_schedule(args.pool), args.methods, seeds=args.seeds, labels=args.labels,
                     ewc_lambda=args.ewc_lambda, replay_fraction=args.replay_fraction,
                     steps_per_phase=args.steps_per_phase, max_tokens=args.max_tokens, tracker=tracker)
        print(f"\nMLflow run {tracker.run_id} ({tracker.artifact_uri})")
    print(f"\nphases: {'; '.join(f'{p.name} ({len(p.items)} items)' for p in result.phases)}; labels {args.labels}; "
          f"seeds {args.seeds}; {args.steps_per_phase} updates per phase\n")
    print(result.to_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
