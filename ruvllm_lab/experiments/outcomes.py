"""The outcome matrix: every tier answers every query once, cached on disk.

``collect_outcomes`` asks each tier each query through ``InferencePool.generate`` (greedy,
``max_tokens`` small, the tier's own prompt format; one untimed warm-up call per tier first, so no
latency includes a model load).  Generations are cached per (tier, generation settings) in one
parquet (CSV without pyarrow) under ``<system.cache_dir>/outcomes`` -- outside the source tree --
with rows keyed by the query's hash, so a sweep over routers, seeds, feedback modes or workload
sizes generates each (tier, query) pair once.  Correctness is recomputed from the cached text on
every load with the one strict matcher (``workloads.is_correct``), so a better matcher never needs
regeneration.

Collect once from the shell (the routing and forgetting experiments then read the cache)::

    python -m ruvllm_lab.experiments.outcomes --config configs/server-cpu.toml --n 300 --max-tokens 16
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from .. import models
from ..config import Config
from ..workloads import FAMILIES, WorkItem, generate, is_correct

SYSTEM_PROMPT = "Answer the question with only the answer, no explanation."
PROMPT_VERSION = 1  # bump when the prompt changes: it is part of the cache key


def judge_correct(item: WorkItem, text: str) -> bool:
    """Gold match of a generated answer: the strict ``workloads.is_correct``."""
    return is_correct(item, text or "")


def default_cache_dir(config: Config) -> Path:
    """``<system.cache_dir>/outcomes`` (``~`` expanded)."""
    return Path(os.path.expanduser(config.system.cache_dir)) / "outcomes"


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

    def subset(self, index: Sequence[int]) -> "OutcomeMatrix":
        """The rows ``index`` (in that order): a permuted or sub-sampled workload."""
        idx = np.asarray(index, dtype=np.int64)
        return OutcomeMatrix([self.items[i] for i in idx], list(self.tiers), self.texts[idx], self.correct[idx],
                             self.latency_ms[idx], self.prompt_tokens[idx], self.completion_tokens[idx], 0)

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

    def headroom(self) -> dict[str, float]:
        """What any router could gain: quality of the oracle (cheapest correct tier; unsolved queries
        at the smallest tier) and its cost, against always-largest."""
        lab = self.labels("smallest")
        q = np.arange(len(self.items))
        return {"oracle_quality": float(self.correct.any(axis=1).mean()),
                "oracle_cost": float(self.cost[q, lab].mean()),
                "largest_quality": float(self.correct[:, -1].mean()),
                "largest_cost": float(self.cost[:, -1].mean())}

    def static_policy_bound(self, groups: Sequence[str], min_quality: float) -> dict[str, Any]:
        """Evaluation only, like the oracle: the cheapest policy that sends every query of a group (e.g.
        its family) to one tier and reaches ``min_quality``, chosen knowing every outcome.  Found by
        sweeping the Lagrangian price of cost (per group, the tier maximising correct - price * cost);
        what a router that knows only the group could at best do.  ``{}`` when no price reaches it."""
        groups = np.asarray(list(groups))
        if len(groups) != len(self.items):
            raise ValueError(f"{len(groups)} group labels for {len(self.items)} queries")
        names = sorted(set(groups.tolist()))
        corr, cost, q = self.correct.astype(float), self.cost, np.arange(len(self.items))
        best: dict[str, Any] = {}
        for price in np.linspace(0.0, 2.0 / max(float(cost.max()), 1e-9), 2001):
            pick = np.zeros(len(q), np.int64)
            for g in names:
                m = groups == g
                pick[m] = int(np.argmax(corr[m].sum(0) - price * cost[m].sum(0)))
            quality, mean_cost = float(corr[q, pick].mean()), float(cost[q, pick].mean())
            if quality >= min_quality and (not best or mean_cost < best["cost"]):
                best = {"quality": quality, "cost": mean_cost,
                        "cost_reduction": 1.0 - mean_cost / float(cost[:, -1].mean()),
                        "tiers": {g: self.tiers[int(pick[groups == g][0])] for g in names}}
        return best

    def monotonicity(self) -> dict[str, Any]:
        """How far the ladder is from "a larger tier answers whatever a cheaper one does" (the cumulative
        router's assumption): the share of queries where some cheaper tier is right and a larger one
        wrong, and per tier pair (t, u > t) P(u wrong | t right)."""
        c, n = self.correct, len(self.tiers)
        violated = np.zeros(len(c), bool)
        pairs = {}
        for t in range(n):
            for u in range(t + 1, n):
                violated |= c[:, t] & ~c[:, u]
                if c[:, t].any():
                    pairs[f"{self.tiers[u]} wrong | {self.tiers[t]} right"] = float((~c[c[:, t], u]).mean())
        return {"violated_share": float(violated.mean()), "pairs": pairs}


def collect_outcomes(config: Config, items: Sequence[WorkItem], tiers: Sequence[str] | None = None, *,
                     max_tokens: int = 16, cache_dir: str | os.PathLike | None = None, pool: Any = None,
                     progress: Callable[[str, int, int], None] | None = None) -> OutcomeMatrix:
    """Answer every item with every tier (cached); see the module docstring.

    ``pool``: an ``InferencePool`` to reuse; by default one is built from ``config.inference``
    with ``models = tiers`` (tiers are visited one after another so one loaded model suffices).
    ``cache_dir`` defaults to ``default_cache_dir(config)``.
    """
    tiers = list(tiers or config.inference.models)
    if not tiers:
        raise ValueError("collect_outcomes needs at least one tier")
    if not items:
        raise ValueError("collect_outcomes needs at least one work item")
    cache = Path(cache_dir) if cache_dir else default_cache_dir(config)
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
                        own_pool = make_pool(config, tiers)
                    gen_pool = pool if pool is not None else own_pool
                    # load the model first so no measured latency includes loading it
                    gen_pool.generate(tier, "Hello", max_tokens=1, temperature=0.0)
                    new_rows = []
                    try:
                        for n_done, i in enumerate(missing):
                            if keys[i] in have:  # a duplicate query is generated once
                                continue
                            g = gen_pool.generate(tier, [{"role": "system", "content": SYSTEM_PROMPT},
                                                         {"role": "user", "content": items[i].query}],
                                                  max_tokens=max_tokens, temperature=0.0)
                            row = {"query_key": keys[i], "query": items[i].query, "text": g.text,
                                   "latency_ms": float(g.latency_ms), "ttft_ms": float(g.ttft_ms),
                                   "prompt_tokens": int(g.prompt_tokens),
                                   "completion_tokens": int(g.completion_tokens), "finish_reason": g.finish_reason}
                            have[keys[i]] = row
                            new_rows.append(row)
                            generated += 1
                            if progress:
                                progress(tier, n_done + 1, len(missing))
                    finally:  # an interrupted long collection keeps what it made
                        if new_rows:
                            table = pd.concat([table, pd.DataFrame(new_rows, columns=_OUTCOME_COLUMNS)],
                                              ignore_index=True)
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


def make_pool(config: Config, tiers: Sequence[str]):
    """An ``InferencePool`` over ``tiers`` with greedy defaults."""
    from ..inference import InferencePool

    inf = dataclasses.replace(config.inference, models=list(tiers), temperature=0.0)
    return InferencePool(inf, config.system)


def _tqdm_progress():
    """A ``progress`` callback drawing one tqdm.auto bar per tier."""
    from tqdm.auto import tqdm

    bars: dict[str, Any] = {}

    def progress(tier: str, done: int, total: int) -> None:
        bar = bars.get(tier)
        if bar is None:
            bar = bars[tier] = tqdm(total=total, desc=f"outcomes {tier}", unit="query")
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()
    return progress


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Collect (and cache) the tier x query outcome matrix.")
    p.add_argument("--config", default="configs/server-cpu.toml")
    p.add_argument("--n", type=int, default=300, help="distinct generated queries")
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--cache-dir", default="")
    args = p.parse_args(argv)
    config = Config.load(args.config)
    items = generate(args.families.split(","), args.n, args.seed, distinct=True)
    out = collect_outcomes(config, items, max_tokens=args.max_tokens, cache_dir=args.cache_dir or None,
                           progress=_tqdm_progress())
    print(f"{len(items)} queries x {len(out.tiers)} tiers, {out.generated} generated now")
    print(out.tier_table().round(3).to_string(index=False))
    print(out.headroom())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
