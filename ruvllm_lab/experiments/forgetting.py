"""Forgetting experiment: the FastGRNN router learns phases of a shifting workload in turn.

For every method the same fresh router (same seed) trains on phase 0, then phase 1, ...;
after each phase (and every ``eval_every`` updates) it is evaluated on the held-out test
split of *every* phase.  That fills the accuracy matrix ``A[i, j]`` (after training phase i,
on phase j) from which ``ruvllm_lab.learning.metrics`` computes average accuracy, forgetting
F (and per phase F_j), backward transfer and forgetting per 10K updates.

Methods (composable; ``"ewc+replay"`` uses both):

* ``naive``  -- plain minibatch training on the current phase;
* ``ewc``    -- online EWC: the loss adds ``lam/2 * sum F (theta - theta*)^2``; after each
  phase the per-sample Fisher on that phase's training set is consolidated
  (``F <- gamma F_old + F_new``, ``learning.ewc_gamma``);
* ``replay`` -- every minibatch of fresh examples is joined by as many examples sampled from
  a reservoir ``ReplayBuffer(buffer_size)`` of all earlier training examples.

Labels (the router's target tier per query):

* ``labels="synthetic"`` (default; no LLM, seconds): a fixed rule -- harder queries and
  harder families need larger tiers.  With T tiers,
  ``tier = round(clip((difficulty - 1 + FAMILY_SHIFT[family]) / 2, 0, 1) * (T - 1))``.
* ``labels="outcomes"``: the cheapest correct tier from the routing experiment's cached
  outcome matrix (every tier answers every query once; slow the first time).

An *update* is one optimizer step on the router's weights; accuracy is the router's argmax
tier against the label (no fallback), on test items it never trained on.
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..config import Config
from ..workloads import DEFAULT_PHASES, Phase, WorkItem, shift_schedule
from .tracking import NullTracker, Tracker, log_config

METHODS = ("naive", "ewc", "replay", "ewc+replay")
FAMILY_SHIFT = {"arithmetic": 1, "units": 1, "date": 1, "string": 0, "factual": -1}


def synthetic_label(item: WorkItem, n_tiers: int) -> int:
    """The synthetic rule of the module docstring (unknown families shift by 0)."""
    rank = (item.difficulty - 1 + FAMILY_SHIFT.get(item.family, 0)) / 2.0
    return int(round(min(max(rank, 0.0), 1.0) * (n_tiers - 1)))


def _default_tiers(config: Config) -> list[str]:
    from .. import models
    tiers = list(config.inference.models)
    return tiers if len(tiers) >= 2 else list(models.LADDER)[:3]


@dataclass
class ForgettingResult:
    summary: pd.DataFrame  # one row per method
    matrices: dict[str, pd.DataFrame]  # method -> accuracy matrix (rows: trained phase, cols: eval phase)
    timeline: pd.DataFrame  # method, update, phase (trained so far), eval_phase, accuracy
    phases: list[Phase]
    figures: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def to_markdown(self) -> str:
        from .routing import _markdown
        return _markdown(self.summary[["method", "average_accuracy", "forgetting", "backward_transfer",
                                       "forgetting_per_10k_updates", "updates", "train_s"]])


def run(config: Config, schedule: Sequence[Phase] | None = None, methods: Sequence[str] = METHODS, *,
        ewc_lambda: float | None = None, buffer_size: int | None = None, tiers: Sequence[str] | None = None,
        labels: str = "synthetic", epochs_per_phase: int = 40, batch_size: int | None = 16,
        learning_rate: float | None = None, test_fraction: float = 0.3, eval_every: int | None = None,
        seed: int = 0, embedder: Any = None, cache_dir: Any = None, max_tokens: int = 24,
        tracker: Tracker | None = None) -> ForgettingResult:
    """Run every method over ``schedule`` (default: ``shift_schedule(DEFAULT_PHASES, 60, seed)``).

    ``ewc_lambda``/``buffer_size`` default to ``learning.ewc_lambda``/``learning.replay_capacity``;
    ``batch_size``/``learning_rate`` to the router section.  Logs per method
    ``<method>/<metric>`` (summary columns), ``<method>/acc_phase<j>`` over updates, the
    matrices and timeline as CSV, and the figures ``accuracy_over_time.png`` and
    ``forgetting_summary.png``.
    """
    import torch

    from ..learning.ewc import EWCState
    from ..learning.metrics import AccuracyMatrix, continual_report, forgetting_per_phase
    from ..learning.replay import ReplayBuffer
    from ..router import RouterExample, build_model
    from ..router.features import featurise
    from ..router.train import accuracy, router_loss, train_steps
    from .routing import build_inputs, collect_outcomes, make_embedder

    tracker = tracker or NullTracker()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown forgetting method(s) {unknown}; known: {', '.join(METHODS)}")
    if labels not in ("synthetic", "outcomes"):
        raise ValueError(f"labels must be 'synthetic' or 'outcomes', got {labels!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    phases = list(schedule) if schedule is not None else shift_schedule(DEFAULT_PHASES, 60, seed)
    if len(phases) < 2:
        raise ValueError("a forgetting run needs at least two phases")
    tiers = list(tiers or _default_tiers(config))
    lam = config.learning.ewc_lambda if ewc_lambda is None else float(ewc_lambda)
    capacity = config.learning.replay_capacity if buffer_size is None else int(buffer_size)
    bs = batch_size or config.router.batch_size
    lr = config.router.learning_rate if learning_rate is None else learning_rate
    rc = config.router

    params = {"experiment": "forgetting", "methods": ",".join(methods), "phases": len(phases),
              "n_per_phase": len(phases[0].items), "mixes": "; ".join(p.name for p in phases), "tiers": ",".join(tiers),
              "labels": labels, "ewc_lambda": lam, "buffer_size": capacity, "epochs_per_phase": epochs_per_phase,
              "batch_size": bs, "learning_rate": lr, "test_fraction": test_fraction, "seed": seed}
    log_config(tracker, config)
    tracker.log_params({f"exp.{k}": v for k, v in params.items()})

    # ---- examples: features once, shared by every method -----------------------------------------
    all_items = [it for p in phases for it in p.items]
    embedder = embedder or make_embedder(config)
    vectors = embedder.embed([it.query for it in all_items])
    counts = [embedder.count_tokens(it.query) for it in all_items]
    inputs = build_inputs(all_items, vectors, counts, tiers, None, max_tokens=max_tokens,
                          similarity_threshold=config.memory.similar_edge_min_score)
    if labels == "synthetic":
        y = np.array([synthetic_label(it, len(tiers)) for it in all_items])
    else:
        y = collect_outcomes(config, all_items, tiers, max_tokens=max_tokens, cache_dir=cache_dir).labels()
    examples = [RouterExample(x=x, best_tier=tiers[int(t)]) for x, t in zip(inputs, y)]
    train_sets, test_batches, offset = [], [], 0
    for p in phases:
        ex = examples[offset:offset + len(p.items)]
        offset += len(p.items)
        n_test = max(1, int(round(test_fraction * len(ex))))
        if len(ex) - n_test < 1:
            raise ValueError(f"{p.name}: {len(ex)} items leave nothing to train on at test_fraction={test_fraction}")
        train_sets.append(ex[:-n_test])
        test_batches.append(featurise(ex[-n_test:], tiers, vectors.shape[1], rc.context_buckets, rc.hidden_dim))
    steps_per_phase = [epochs_per_phase * math.ceil(len(tr) / bs) for tr in train_sets]
    eval_every = eval_every or max(1, min(steps_per_phase) // 4)

    def batch_of(exs):
        return featurise(exs, tiers, vectors.shape[1], rc.context_buckets, rc.hidden_dim)

    def as_dict(b):
        return {f.name: getattr(b, f.name) for f in fields(b)}

    consolidate_kwargs = {"method": "loop"} if "method" in inspect.signature(EWCState.consolidate).parameters else {}

    rows, matrices, timeline = [], {}, []
    for method in methods:
        use_ewc, use_replay = "ewc" in method, "replay" in method
        model = build_model(vectors.shape[1], tiers, rc, seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        ewc = EWCState(lam=lam, gamma=config.learning.ewc_gamma)
        buffer = ReplayBuffer(capacity, seed=seed)
        rng = np.random.default_rng(seed)
        acc_matrix = AccuracyMatrix(len(phases))
        updates, updates_at_end = 0, []
        t0 = time.perf_counter()

        def evaluate(trained_upto: int) -> list[float]:
            accs = [accuracy(model, tb) for tb in test_batches]
            for j, a in enumerate(accs):
                timeline.append({"method": method, "update": updates, "phase": trained_upto, "eval_phase": j,
                                 "accuracy": a})
            tracker.log_metrics({f"{method}/acc_phase{j}": a for j, a in enumerate(accs)}, step=updates)
            return accs

        evaluate(-1)
        for k, train in enumerate(train_sets):
            penalty = ewc.penalty if (use_ewc and ewc.active) else None
            for _ in range(epochs_per_phase):
                order = rng.permutation(len(train))
                for s in range(0, len(train), bs):
                    fresh = [train[i] for i in order[s:s + bs]]
                    mixed = fresh + (buffer.sample(len(fresh)) if use_replay and len(buffer) else [])
                    train_steps(model, [batch_of(mixed)], optimizer=optimizer, extra_penalty=penalty)
                    updates += 1
                    if updates % eval_every == 0:
                        evaluate(k)
            for j, a in enumerate(evaluate(k)):
                acc_matrix.record(k, j, a)
            updates_at_end.append(updates)
            if use_replay:
                buffer.extend(train)
            if use_ewc and lam > 0:
                minis = [as_dict(batch_of(train[s:s + bs])) for s in range(0, len(train), bs)]
                ewc.consolidate(model, minis, lambda m, d: router_loss(m, type(test_batches[0])(**d)),
                                per_sample=True, **consolidate_kwargs)
        train_s = time.perf_counter() - t0
        a = acc_matrix.as_array()
        rep = continual_report(a, updates_at_end)
        per_phase = forgetting_per_phase(a)
        row = {"method": method, **rep, "final_accuracy_current": float(a[-1, len(phases) - 1]),
               "updates": updates, "train_s": train_s}
        for j, f in enumerate(per_phase):
            row[f"F_{j}"] = float(f)
        rows.append(row)
        matrices[method] = pd.DataFrame(a, index=[f"after_{p.name}" for p in phases],
                                        columns=[f"on_{p.name}" for p in phases])

    summary = pd.DataFrame(rows)
    result = ForgettingResult(summary=summary, matrices=matrices, timeline=pd.DataFrame(timeline), phases=phases,
                              params=params)
    result.figures = {"accuracy_over_time": plot_accuracy_over_time(result),
                      "forgetting_summary": plot_summary(result)}
    for row in summary.to_dict("records"):
        tracker.log_metrics({f"{row['method']}/{k}": v for k, v in row.items()
                             if k != "method" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    tracker.log_table(summary, "forgetting_summary.csv")
    tracker.log_table(result.timeline, "forgetting_timeline.csv")
    for method, m in matrices.items():
        tracker.log_table(m.reset_index(names="trained"), f"accuracy_matrix_{method.replace('+', '_')}.csv")
    tracker.log_text(result.to_markdown(), "forgetting_summary.md")
    for name, fig in result.figures.items():
        tracker.log_figure(fig, f"{name}.png")
    return result


def plot_accuracy_over_time(result: ForgettingResult):
    """One panel per method: test accuracy on each phase against updates; dotted lines mark phase ends."""
    import matplotlib.pyplot as plt

    methods = list(result.summary["method"])
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.2), sharey=True, squeeze=False)
    tl = result.timeline
    for ax, method in zip(axes[0], methods):
        d = tl[tl["method"] == method]
        for j, p in enumerate(result.phases):
            dj = d[d["eval_phase"] == j]
            ax.plot(dj["update"], dj["accuracy"], lw=1.2, label=f"phase {j}")
        ends = d.groupby("phase")["update"].max()
        for k, u in ends.items():
            if k >= 0:
                ax.axvline(u, ls=":", color="grey", lw=0.8)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("updates")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("router accuracy (test split)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_summary(result: ForgettingResult):
    """Average accuracy and forgetting per method, side by side."""
    import matplotlib.pyplot as plt

    s = result.summary
    x = np.arange(len(s))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(x - 0.2, s["average_accuracy"], 0.4, label="average accuracy")
    ax.bar(x + 0.2, s["forgetting"], 0.4, label="forgetting F")
    ax.set_xticks(x, s["method"])
    ax.axhline(0, color="black", lw=0.6)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig
