"""Routing experiment: every tier answers every query once; routers learn online from the outcomes.

Pipeline (``run``):

1. **Outcome matrix** (``collect_outcomes``): each tier answers each query once through
   ``InferencePool.generate`` (greedy, ``max_tokens`` small, the tier's own prompt format via
   the pool; one untimed warm-up call per tier first, so no latency includes a model load).
   Generations are cached on disk per tier -- one parquet (CSV without pyarrow)
   per (tier, generation settings), rows keyed by the query's hash -- so a sweep over routers,
   seeds or workload sizes generates each (tier, query) pair once.  Correctness is recomputed
   from the cached text on every load (``judge_correct``), so a better gold matcher never
   needs regeneration.
2. **Features**: one ``RouterInput`` per query from its MiniLM embedding
   (``EmbeddingService``), its token count, the best cosine similarity to the queries seen
   before it (a memory of past queries), and the running quality of each tier so far.
3. **Online learning** in arrival order (prequential, test-then-train): each router routes
   query t, is charged the outcome of the tier it picked, and then receives the label
   (the *cheapest correct tier*; the cheapest tier when none is correct) through
   ``partial_fit`` every ``update_every`` queries.  The oracle is fitted on all labels up
   front: it is the upper bound.
4. **Report**: quality, cost (parameter-weighted tokens = tokens x ``relative_cost`` of the
   tier, and measured latency), cost reduction against always-largest (at the operating
   point and at matched quality on the curve), RouteLLM's APGR and CPT(50%)/CPT(80%), router
   accuracy against the oracle, and the cost-quality curve.

The curve of a router comes from a threshold on its cumulative tier distribution: at
threshold tau a query goes to the cheapest tier i with ``P(best tier <= i) >= tau``
(tau = 0: always-smallest; the curve is closed by the always-largest point).  With two tiers
this is RouteLLM's threshold on the strong model's win probability.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from .. import models
from ..config import Config
from ..workloads import WorkItem, is_correct
from . import metrics as M
from .tracking import NullTracker, Tracker, log_config

DEFAULT_ROUTERS = ("fastgrnn", "knn", "logreg", "random", "always-smallest", "always-largest", "oracle")
SYSTEM_PROMPT = "Answer the question with only the answer, no explanation."
PROMPT_VERSION = 1  # bump when the prompt changes: it is part of the cache key
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[2] / "data" / "cache" / "outcomes"


# ---- correctness ---------------------------------------------------------------------------

def judge_correct(item: WorkItem, text: str) -> bool:
    """Gold match of a generated answer.

    ``case`` items (uppercase/reverse tasks) use the case-sensitive ``workloads.is_correct``:
    a case-folding matcher would accept an echo of the query.  Other items use the learning
    judge's ``gold_match`` when that module is present, else ``workloads.is_correct``.
    """
    if item.match == "case":
        return is_correct(item, text)
    try:
        from ..learning.judge import gold_match
    except ImportError:  # the learning package is optional for this experiment
        return is_correct(item, text)
    return bool(gold_match(text or "", item.answer).matched)


# ---- outcome matrix -------------------------------------------------------------------------

def query_key(query: str) -> str:
    return hashlib.sha256(query.encode()).hexdigest()[:16]


def generation_key(tier: str, max_tokens: int, max_context: int) -> str:
    """Hash of everything that changes a greedy generation: model bytes, prompt, limits."""
    spec = models.resolve(tier)
    blob = json.dumps({"tier": spec.name, "size": spec.size_bytes, "file": spec.file_name, "format": spec.prompt_format,
                       "system": SYSTEM_PROMPT, "prompt_version": PROMPT_VERSION, "max_tokens": max_tokens,
                       "max_context": max_context, "temperature": 0.0}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


_OUTCOME_COLUMNS = ["query_key", "query", "text", "latency_ms", "ttft_ms", "prompt_tokens", "completion_tokens",
                    "finish_reason"]


def _read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame(columns=_OUTCOME_COLUMNS)
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, keep_default_na=False)


def _write_table(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if path.suffix == ".parquet":
        df.to_parquet(tmp, index=False)
    else:
        df.to_csv(tmp, index=False)
    os.replace(tmp, path)  # readers never see a half-written cache


def _table_suffix() -> str:
    try:
        import pyarrow  # noqa: F401
        return ".parquet"
    except ImportError:
        return ".csv"


@dataclass
class OutcomeMatrix:
    """Tier x query outcomes. Arrays are (Q, T) with tiers in ladder order (cheapest first)."""

    items: list[WorkItem]
    tiers: list[str]
    texts: np.ndarray  # (Q, T) object
    correct: np.ndarray  # (Q, T) bool
    latency_ms: np.ndarray  # (Q, T) float
    prompt_tokens: np.ndarray  # (Q, T) int
    completion_tokens: np.ndarray  # (Q, T) int
    generated: int = 0  # how many (query, tier) pairs were generated (not read from cache) this time

    @property
    def relative_costs(self) -> np.ndarray:
        return np.array([models.resolve(t).relative_cost for t in self.tiers])

    @property
    def cost(self) -> np.ndarray:
        """(Q, T) parameter-weighted tokens: (prompt + completion tokens) x relative_cost(tier)."""
        return (self.prompt_tokens + self.completion_tokens) * self.relative_costs[None, :]

    def labels(self, unsolved: str = "smallest") -> np.ndarray:
        """(Q,) index of the cheapest correct tier; ``unsolved`` ('smallest'|'largest') when none is correct."""
        any_ok = self.correct.any(axis=1)
        first = self.correct.argmax(axis=1)
        fill = 0 if unsolved == "smallest" else len(self.tiers) - 1
        return np.where(any_ok, first, fill)

    def frame(self) -> pd.DataFrame:
        """Long table: one row per (query, tier)."""
        rows = []
        for q, item in enumerate(self.items):
            for t, tier in enumerate(self.tiers):
                rows.append({"item": q, "family": item.family, "difficulty": item.difficulty, "tier": tier,
                             "query": item.query, "gold": item.answer, "answer": self.texts[q, t],
                             "correct": bool(self.correct[q, t]), "latency_ms": float(self.latency_ms[q, t]),
                             "prompt_tokens": int(self.prompt_tokens[q, t]),
                             "completion_tokens": int(self.completion_tokens[q, t]), "cost": float(self.cost[q, t])})
        return pd.DataFrame(rows)

    def tier_table(self) -> pd.DataFrame:
        """Quality, cost and latency of each tier alone, overall and per family."""
        df = self.frame()
        overall = df.groupby("tier", sort=False).agg(quality=("correct", "mean"), cost=("cost", "mean"),
                                                     latency_ms=("latency_ms", "mean")).reset_index()
        fam = df.pivot_table(index="tier", columns="family", values="correct", aggfunc="mean", sort=False)
        fam.columns = [f"quality/{c}" for c in fam.columns]
        return overall.merge(fam.reset_index(), on="tier")


def collect_outcomes(config: Config, items: Sequence[WorkItem], tiers: Sequence[str] | None = None, *,
                     max_tokens: int = 24, cache_dir: str | os.PathLike | None = None, pool: Any = None,
                     progress: Callable[[str, int, int], None] | None = None) -> OutcomeMatrix:
    """Answer every item with every tier (cached); see the module docstring.

    ``pool``: an ``InferencePool`` to reuse; by default one is built from ``config.inference``
    with ``models = tiers`` (tiers are visited one after another so one loaded model suffices).
    """
    tiers = list(tiers or config.inference.models)
    if not tiers:
        raise ValueError("collect_outcomes needs at least one tier")
    if not items:
        raise ValueError("collect_outcomes needs at least one work item")
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    keys = [query_key(it.query) for it in items]
    q, t_n = len(items), len(tiers)
    texts = np.empty((q, t_n), dtype=object)
    latency = np.zeros((q, t_n))
    ptok = np.zeros((q, t_n), dtype=np.int64)
    ctok = np.zeros((q, t_n), dtype=np.int64)
    own_pool = None
    generated = 0
    try:
        for j, tier in enumerate(tiers):
            path = cache / f"{_slug(tier)}-{generation_key(tier, max_tokens, config.inference.max_context)}{_table_suffix()}"
            with _locked(path):
                table = _read_table(path)
                have = {k: row for k, row in zip(table["query_key"], table.to_dict("records"))}
                missing = [i for i, k in enumerate(keys) if k not in have]
                if missing:
                    if pool is None and own_pool is None:
                        own_pool = _make_pool(config, tiers)
                    gen_pool = pool if pool is not None else own_pool
                    # load the model first so no measured latency includes loading it
                    gen_pool.generate(tier, "Hello", max_tokens=1, temperature=0.0)
                    new_rows = []
                    for n_done, i in enumerate(missing):
                        if keys[i] in have:  # a duplicate query is generated once
                            continue
                        g = gen_pool.generate(tier, [{"role": "system", "content": SYSTEM_PROMPT},
                                                     {"role": "user", "content": items[i].query}],
                                              max_tokens=max_tokens, temperature=0.0)
                        row = {"query_key": keys[i], "query": items[i].query, "text": g.text,
                               "latency_ms": float(g.latency_ms), "ttft_ms": float(g.ttft_ms),
                               "prompt_tokens": int(g.prompt_tokens), "completion_tokens": int(g.completion_tokens),
                               "finish_reason": g.finish_reason}
                        have[keys[i]] = row
                        new_rows.append(row)
                        generated += 1
                        if progress:
                            progress(tier, n_done + 1, len(missing))
                    table = pd.concat([table, pd.DataFrame(new_rows, columns=_OUTCOME_COLUMNS)], ignore_index=True)
                    _write_table(table, path)
            for i, k in enumerate(keys):
                row = have[k]
                texts[i, j] = str(row["text"])
                latency[i, j] = float(row["latency_ms"])
                ptok[i, j] = int(row["prompt_tokens"])
                ctok[i, j] = int(row["completion_tokens"])
    finally:
        if own_pool is not None:
            own_pool.close()
    correct = np.array([[judge_correct(items[i], texts[i, j]) for j in range(t_n)] for i in range(q)], dtype=bool)
    return OutcomeMatrix(list(items), tiers, texts, correct, latency, ptok, ctok, generated)


def _slug(tier: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in Path(tier).name)


class _locked:
    """An exclusive flock beside ``path``: parallel sweep processes share one cache safely."""

    def __init__(self, path: Path):
        self.lock_path = path.with_name(path.name + ".lock")

    def __enter__(self):
        self.fh = open(self.lock_path, "w")
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def _make_pool(config: Config, tiers: Sequence[str]):
    import dataclasses

    try:
        from ..inference import InferencePool
    except ImportError:  # package __init__ not written yet: the module itself
        from ..inference.pool import InferencePool
    inf = dataclasses.replace(config.inference, models=list(tiers), temperature=0.0)
    return InferencePool(inf, config.system)


# ---- router inputs ----------------------------------------------------------------------------

def make_embedder(config: Config):
    from ..embedding import EmbeddingService
    return EmbeddingService(config.embedding)


def build_inputs(items: Sequence[WorkItem], vectors: np.ndarray, token_counts: Sequence[int],
                 tiers: Sequence[str], labels_correct: np.ndarray | None = None, *, max_tokens: int | None = None,
                 similarity_threshold: float = 0.5, max_hits: int = 8) -> list:
    """One ``RouterInput`` per item, in arrival order.

    ``top_similarity``/``hit_count`` describe a memory holding the queries seen before this one
    (max cosine, and how many past queries reach ``similarity_threshold``, capped at
    ``max_hits``).  ``tier_quality[tier]`` is that tier's accuracy over the earlier queries
    (``labels_correct`` (Q, T) bool; unknown before the first label).
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


# ---- online routing --------------------------------------------------------------------------

@dataclass
class RouterTrace:
    """What one router did over the workload, query by query."""

    name: str
    chosen: np.ndarray  # (Q,) tier index served
    probs: np.ndarray  # (Q, T) the router's tier distribution at decision time
    fallback: np.ndarray  # (Q,) bool
    route_ms: np.ndarray  # (Q,) wall time of route()
    fit_ms: float = 0.0  # total wall time in fit/partial_fit


def run_online(router: Any, inputs: list, labels: np.ndarray, tiers: Sequence[str], update_every: int = 8,
               oracle: bool = False) -> RouterTrace:
    """Prequential loop: route query t, then (every ``update_every`` queries) learn the labels seen."""
    from ..router import RouterExample

    tiers = list(tiers)
    examples = [RouterExample(x=x, best_tier=tiers[int(y)]) for x, y in zip(inputs, labels)]
    fit_ms = 0.0
    if oracle:
        t0 = time.perf_counter()
        router.fit(examples)
        fit_ms += (time.perf_counter() - t0) * 1000
    q = len(inputs)
    chosen = np.zeros(q, np.int64)
    probs = np.zeros((q, len(tiers)))
    fallback = np.zeros(q, bool)
    route_ms = np.zeros(q)
    pending: list = []
    for i, x in enumerate(inputs):
        t0 = time.perf_counter()
        d = router.route(x)
        route_ms[i] = (time.perf_counter() - t0) * 1000
        chosen[i] = tiers.index(d.tier)
        probs[i] = [d.tier_probs.get(t, 0.0) for t in tiers]
        fallback[i] = d.fallback_used
        if not oracle:
            pending.append(examples[i])
            if len(pending) >= update_every or i == q - 1:
                t0 = time.perf_counter()
                router.partial_fit(pending)
                fit_ms += (time.perf_counter() - t0) * 1000
                pending = []
    return RouterTrace(getattr(router, "name", str(router)), chosen, probs, fallback, route_ms, fit_ms)


def threshold_curve(probs: np.ndarray, correct: np.ndarray, cost: np.ndarray, max_points: int = 41) -> pd.DataFrame:
    """Cost-quality points of the cumulative-threshold rule (module docstring), closed by always-largest."""
    cum = np.cumsum(probs, axis=1)  # (Q, T)
    taus = np.unique(np.concatenate([[0.0], np.round(cum.ravel(), 9)]))
    if taus.size > max_points:
        taus = np.unique(np.quantile(taus, np.linspace(0, 1, max_points)))
    q_idx = np.arange(len(probs))
    rows = []
    for tau in taus:
        tier = np.argmax(cum >= tau - 1e-9, axis=1)  # first tier whose cumulative mass reaches tau
        rows.append({"tau": float(tau), "cost": float(cost[q_idx, tier].mean()),
                     "quality": float(correct[q_idx, tier].mean())})
    last = correct.shape[1] - 1
    rows.append({"tau": math.inf, "cost": float(cost[:, last].mean()), "quality": float(correct[:, last].mean())})
    return pd.DataFrame(rows)


# ---- result ----------------------------------------------------------------------------------

@dataclass
class RoutingResult:
    summary: pd.DataFrame  # one row per router
    curves: pd.DataFrame  # router, tau, cost, norm_cost, quality
    decisions: pd.DataFrame  # one row per (router, query)
    tiers: pd.DataFrame  # each tier alone: quality, cost, latency, per-family quality
    outcomes: OutcomeMatrix
    figures: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def to_markdown(self, columns: Sequence[str] | None = None) -> str:
        cols = list(columns or ["router", "quality", "cost", "latency_ms", "cost_reduction", "apgr", "cpt50", "cpt80",
                                "cost_reduction_matched", "oracle_agreement"])
        return _markdown(self.summary[cols])


def _markdown(df: pd.DataFrame) -> str:
    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "–" if math.isnan(v) else f"{v:.3f}"
        return str(v)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    for row in df.itertuples(index=False):  # keeps each column's dtype (iterrows upcasts ints to float)
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def summarise(trace: RouterTrace, outcomes: OutcomeMatrix, labels: np.ndarray, curve: pd.DataFrame) -> dict:
    """One summary row: operating point, cost reductions, RouteLLM curve metrics, oracle agreement."""
    correct, cost, lat = outcomes.correct, outcomes.cost, outcomes.latency_ms
    q_idx = np.arange(len(trace.chosen))
    q_weak, q_strong = float(correct[:, 0].mean()), float(correct[:, -1].mean())
    c_weak, c_strong = float(cost[:, 0].mean()), float(cost[:, -1].mean())
    quality = float(correct[q_idx, trace.chosen].mean())
    mean_cost = float(cost[q_idx, trace.chosen].mean())
    row = {
        "router": trace.name,
        "quality": quality,
        "cost": mean_cost,
        "latency_ms": float(lat[q_idx, trace.chosen].mean()),
        "latency_p95_ms": float(np.percentile(lat[q_idx, trace.chosen], 95)),
        "cost_reduction": M.cost_reduction(mean_cost, c_strong),
        "latency_reduction": M.cost_reduction(float(lat[q_idx, trace.chosen].mean()), float(lat[:, -1].mean())),
        "quality_vs_largest": quality - q_strong,
        "pgr": M.pgr(quality, q_weak, q_strong),
        "oracle_agreement": float((trace.chosen == labels).mean()),
        "fallback_rate": float(trace.fallback.mean()),
        "route_ms": float(trace.route_ms.mean()),
        "fit_ms": trace.fit_ms,
    }
    if c_strong > c_weak and len(curve) > 1:
        norm = M.normalised_cost(curve["cost"].to_numpy(), c_weak, c_strong)
        row["apgr"] = M.apgr(norm, curve["quality"], q_weak, q_strong)
        row["cpt50"] = M.cpt(norm, curve["quality"], q_weak, q_strong, 50)
        row["cpt80"] = M.cpt(norm, curve["quality"], q_weak, q_strong, 80)
        row["cost_reduction_matched"] = M.cost_reduction_at_matched_quality(curve["cost"], curve["quality"], q_strong,
                                                                              c_strong)
    else:
        row.update(apgr=math.nan, cpt50=math.nan, cpt80=math.nan, cost_reduction_matched=math.nan)
    for j, tier in enumerate(outcomes.tiers):
        row[f"share/{tier}"] = float((trace.chosen == j).mean())
    return row


def run(config: Config, workload: Sequence[WorkItem], routers: Sequence[str] = DEFAULT_ROUTERS, *,
        tiers: Sequence[str] | None = None, max_tokens: int = 24, cache_dir: str | os.PathLike | None = None,
        update_every: int = 8, seed: int = 0, unsolved: str = "smallest", pool: Any = None, embedder: Any = None,
        tracker: Tracker | None = None, progress: Callable[[str, int, int], None] | None = None) -> RoutingResult:
    """The routing experiment (module docstring). ``tiers`` default to ``config.inference.models``.

    Logs to ``tracker``: the resolved config and experiment params; per router
    ``<router>/<metric>`` for every summary column, plus the online quality every
    ``update_every`` queries as a step series; tables (summary, curves, decisions, tiers,
    outcomes) as CSV and the figures ``cost_quality.png`` and ``online_quality.png``.
    """
    from ..router import make_router

    tracker = tracker or NullTracker()
    tiers = list(tiers or config.inference.models)
    if len(tiers) < 2:
        raise ValueError(f"routing needs at least two tiers to choose from, got {tiers}; "
                         "set inference.models or pass tiers=[...]")
    if unsolved not in ("smallest", "largest"):
        raise ValueError(f"unsolved must be 'smallest' or 'largest', got {unsolved!r}")
    items = list(workload)
    params = {"experiment": "routing", "n_queries": len(items), "tiers": ",".join(tiers), "routers": ",".join(routers),
              "max_tokens": max_tokens, "update_every": update_every, "seed": seed, "unsolved": unsolved}
    log_config(tracker, config)
    tracker.log_params({f"exp.{k}": v for k, v in params.items()})

    outcomes = collect_outcomes(config, items, tiers, max_tokens=max_tokens, cache_dir=cache_dir, pool=pool,
                                progress=progress)
    labels = outcomes.labels(unsolved)
    embedder = embedder or make_embedder(config)
    vectors = embedder.embed([it.query for it in items])
    token_counts = [embedder.count_tokens(it.query) for it in items]
    inputs = build_inputs(items, vectors, token_counts, tiers, outcomes.correct, max_tokens=max_tokens,
                          similarity_threshold=config.memory.similar_edge_min_score)

    c_weak, c_strong = float(outcomes.cost[:, 0].mean()), float(outcomes.cost[:, -1].mean())
    rows, curves, decisions = [], [], []
    for name in routers:
        router = make_router(name, tiers, config.router, input_dim=vectors.shape[1], seed=seed)
        trace = run_online(router, inputs, labels, tiers, update_every=update_every, oracle=(name == "oracle"))
        trace.name = name
        curve = threshold_curve(trace.probs, outcomes.correct, outcomes.cost)
        curve.insert(0, "router", name)
        curve["norm_cost"] = (curve["cost"] - c_weak) / (c_strong - c_weak) if c_strong > c_weak else np.nan
        curves.append(curve)
        rows.append(summarise(trace, outcomes, labels, curve))
        q_idx = np.arange(len(items))
        served_ok = outcomes.correct[q_idx, trace.chosen]
        decisions.append(pd.DataFrame({
            "router": name, "step": q_idx, "family": [it.family for it in items],
            "difficulty": [it.difficulty for it in items], "tier": [tiers[c] for c in trace.chosen],
            "oracle_tier": [tiers[c] for c in labels], "correct": served_ok,
            "cost": outcomes.cost[q_idx, trace.chosen], "latency_ms": outcomes.latency_ms[q_idx, trace.chosen],
            "fallback": trace.fallback}))
        for step in range(update_every, len(items) + 1, update_every):
            tracker.log_metrics({f"{name}/online_quality": float(served_ok[:step].mean()),
                                 f"{name}/online_oracle_agreement": float((trace.chosen[:step] == labels[:step]).mean())},
                                step=step)

    summary = pd.DataFrame(rows)
    result = RoutingResult(summary=summary, curves=pd.concat(curves, ignore_index=True),
                           decisions=pd.concat(decisions, ignore_index=True), tiers=outcomes.tier_table(),
                           outcomes=outcomes, params=params)
    result.figures = {"cost_quality": plot_cost_quality(result), "online_quality": plot_online_quality(result)}
    _log_result(tracker, result)
    return result


def _log_result(tracker: Tracker, result: RoutingResult) -> None:
    for row in result.summary.to_dict("records"):
        name = row["router"]
        tracker.log_metrics({f"{name}/{k}": v for k, v in row.items() if k != "router" and _is_number(v)})
    for row in result.tiers.to_dict("records"):
        tracker.log_metrics({f"tier/{row['tier']}/{k}": v for k, v in row.items() if k != "tier" and _is_number(v)})
    tracker.log_metrics({"outcomes/generated": result.outcomes.generated, "outcomes/queries": len(result.outcomes.items)})
    tracker.log_table(result.summary, "routing_summary.csv")
    tracker.log_table(result.curves, "routing_curves.csv")
    tracker.log_table(result.decisions, "routing_decisions.csv")
    tracker.log_table(result.tiers, "routing_tiers.csv")
    tracker.log_table(result.outcomes.frame(), "routing_outcomes.csv")
    tracker.log_text(result.to_markdown(), "routing_summary.md")
    for name, fig in result.figures.items():
        tracker.log_figure(fig, f"{name}.png")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


# ---- figures ---------------------------------------------------------------------------------

def plot_cost_quality(result: RoutingResult):
    """Normalised cost (0 = always-smallest, 1 = always-largest) against quality, one line per router."""
    import matplotlib.pyplot as plt

    out = result.outcomes
    c_weak, c_strong = float(out.cost[:, 0].mean()), float(out.cost[:, -1].mean())
    span = (c_strong - c_weak) or 1.0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in result.curves.groupby("router", sort=False):
        c = curve.sort_values(["cost", "quality"])
        line, = ax.plot((c["cost"] - c_weak) / span, c["quality"], marker=".", lw=1.2, label=name)
        row = result.summary.set_index("router").loc[name]
        ax.scatter([(row["cost"] - c_weak) / span], [row["quality"]], color=line.get_color(), s=60,
                   edgecolor="black", zorder=5)
    oc, oq = M.optimal_curve(out.correct, out.cost.mean(axis=0))
    ax.plot((oc - c_weak) / span, oq, ls=":", color="black", label="optimal (oracle budget)")
    ax.axhline(out.correct[:, 0].mean(), ls="--", color="grey", lw=0.8, label=f"{out.tiers[0]} alone")
    ax.axhline(out.correct[:, -1].mean(), ls="--", color="red", lw=0.8, label=f"{out.tiers[-1]} alone")
    ax.set_xlabel("normalised cost (parameter-weighted tokens; 0 = smallest, 1 = largest)")
    ax.set_ylabel("quality (gold accuracy)")
    ax.set_title(f"Cost-quality, {len(out.items)} queries, tiers: {', '.join(out.tiers)}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_online_quality(result: RoutingResult, window: int = 20):
    """Rolling served quality per router over arrival order."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, d in result.decisions.groupby("router", sort=False):
        ax.plot(d["step"], d["correct"].astype(float).rolling(window, min_periods=1).mean(), label=name, lw=1)
    ax.set_xlabel("query (arrival order)")
    ax.set_ylabel(f"quality, rolling {window}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
