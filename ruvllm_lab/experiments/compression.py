"""Compression experiment: what does concept compression save, and what does retrieval lose?

Per seed, a memory holds N distinct past interactions (``"Q: <query> A: <gold answer>"``, one
leaf node each, from ``workloads.generate(..., distinct=True)``).  ``n_eval`` of them are asked
again as **held-out paraphrases** (``paraphrase``: fixed templates per family, and the
hand-written ``data/paraphrases.jsonl`` for knowledge facts), never with the stored wording.
For every (cluster count k, depth d) a fresh copy of the memory is compressed with
``ruvllm_lab.compression.compress_memory`` (``k_min = k_max = k``, ``max_depth = d``, members
archived so the index shrinks), and each retrieval mode of ``compression.TreeRetriever`` fills
**one fixed token budget** for every configuration, the uncompressed baseline (``flat``)
included:

* ``descent`` -- HNSW search over the indexed nodes, then RAPTOR tree traversal (``beam`` best
  concepts per layer) down to the leaves;
* ``collapsed`` -- RAPTOR's collapsed tree: leaves and summaries of every level ranked together.

Measured per (seed, configuration):

* **recall** -- the leaf holding the asked item's answer is in the context;
* **answer quality** -- ``tier`` answers the paraphrase from that context; strict gold match
  (``workloads.is_correct``);
* **vectors scored** per query -- HNSW distance evaluations plus every child scored in descent;
* **context tokens** -- tokens actually used out of the budget;
* **indexed nodes** and **compression ratio (nodes)** = indexed nodes before / after (for
  ``collapsed`` the index holds every leaf and every summary, so the ratio is below 1);
* **storage bytes** (SQLite after VACUUM, archived rows included, + the serialised faiss index)
  and **compression ratio (bytes)** = storage before / after;
* summary **faithfulness** (``compression.faithfulness``; nan for extractive summaries).

The summary table gives, per configuration, the mean over seeds and a 95 % percentile-bootstrap
confidence interval of that mean (``metrics.bootstrap_ci``;
none is shown for a single seed).  A run with fewer than ``MIN_SEEDS`` seeds,
fewer than ``MIN_EVAL_QUERIES`` questions per seed, or a memory so small that the first search
could return every node is reported as underpowered (``result.underpowered``, a warning, and
the MLflow tag ``underpowered``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..config import Config
from ..workloads import KNOWLEDGE_PATH, WorkItem, generate, is_correct
from .metrics import bootstrap_ci
from .tracking import NullTracker, Tracker, log_experiment

ANSWER_SYSTEM = "Use the notes to answer the question. Answer with only the answer, no explanation."
PARAPHRASES_PATH = KNOWLEDGE_PATH.parent / "paraphrases.jsonl"
MIN_SEEDS = 5  # below this a 95 % CI over seeds is not worth printing
MIN_EVAL_QUERIES = 30  # per seed: one question moves recall by more than 3 points below this
METRICS = ("recall", "answer_quality", "vectors_scored", "context_tokens", "indexed_nodes", "ratio_nodes",
           "storage_bytes", "ratio_bytes", "concepts", "faithfulness")


def interaction_text(item: WorkItem) -> str:
    return f"Q: {item.query} A: {item.answer}"


# ---- held-out paraphrases ------------------------------------------------------------------------
# One pattern per generator template of ``workloads`` and the rewordings asked instead; the
# trailing instruction ("Answer with just the number.") is kept so the gold stays comparable.
_OPS = {"+": ("Add {a} and {b}.", "Compute the sum of {a} and {b}.", "How much is {a} plus {b}?"),
        "-": ("Subtract {b} from {a}.", "Take {b} away from {a}: what is left?", "How much is {a} minus {b}?"),
        "*": ("Multiply {a} by {b}.", "Compute the product of {a} and {b}.", "How much is {a} times {b}?")}
_TEMPLATES: list[tuple[re.Pattern, tuple[str, ...]]] = [
    (re.compile(r"^Convert (?P<v>\d+) (?P<src>[a-z]+) to (?P<dst>[a-z]+)\.(?P<rest>.*)$"),
     ("How many {dst} are in {v} {src}?{rest}", "Express {v} {src} in {dst}.{rest}")),
    (re.compile(r"^Write the word '(?P<w>\w+)' in uppercase letters\.(?P<rest>.*)$"),
     ("Give the word '{w}' in capital letters.{rest}", "Spell '{w}' using only capitals.{rest}")),
    (re.compile(r"^Reverse the letters of the word '(?P<w>\w+)'\.(?P<rest>.*)$"),
     ("Write '{w}' backwards.{rest}", "Spell the word '{w}' from its last letter to its first.{rest}")),
    (re.compile(r"^How many times does the letter '(?P<l>\w)' appear in the word '(?P<w>\w+)'\?(?P<rest>.*)$"),
     ("Count the occurrences of the letter '{l}' in '{w}'.{rest}", "In the word '{w}', how often does '{l}' occur?{rest}")),
    (re.compile(r"^What day of the week comes (?P<n>\d+) (?P<days>days?) after (?P<d>\w+)\?(?P<rest>.*)$"),
     ("If today is {d}, what weekday will it be in {n} {days}?{rest}",
      "Starting on a {d}, which weekday is it {n} {days} later?{rest}")),
    (re.compile(r"^What date is (?P<n>\d+) days after (?P<d>\d{4}-\d{2}-\d{2})\?(?P<rest>.*)$"),
     ("Which date falls {n} days after {d}?{rest}", "Add {n} days to the date {d}.{rest}")),
    (re.compile(r"^How many days are there from (?P<a>\S+) to (?P<b>\S+?)\?(?P<rest>.*)$"),
     ("Count the days between {a} and {b}.{rest}", "What is the number of days from {a} until {b}?{rest}")),
]
_ARITHMETIC = re.compile(r"^What is (?P<a>\d+) (?P<op>[-+*]) (?P<b>\d+)\?(?P<rest>.*)$")


@lru_cache(maxsize=4)
def load_paraphrases(path: str = str(PARAPHRASES_PATH)) -> dict[str, tuple[str, ...]]:
    """Fact text -> its hand-written rewordings (``data/paraphrases.jsonl`` keyed by fact id)."""
    from ..workloads import load_knowledge

    by_id = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            raw = json.loads(line)
            by_id[raw["id"]] = tuple(raw["paraphrases"])
    return {f.fact: by_id[f.id] for f in load_knowledge() if f.id in by_id}


def paraphrase(item: WorkItem, seed: int = 0) -> str:
    """A rewording of ``item.query`` that asks the same thing; which one is a function of
    (seed, query).  ``ValueError`` for a query no template knows (bring your own eval set)."""
    choices: tuple[str, ...] = ()
    m = _ARITHMETIC.match(item.query)
    if m:
        choices = tuple(t.format(a=m["a"], b=m["b"]) + m["rest"] for t in _OPS[m["op"]])
    elif item.family == "factual" and item.context in load_paraphrases():
        fact_q = item.query.split("?")[0] + "?"
        rest = item.query[len(fact_q):]
        choices = tuple(p if rest in p else p + rest for p in load_paraphrases()[item.context])
    else:
        for pattern, templates in _TEMPLATES:
            m = pattern.match(item.query)
            if m:
                choices = tuple(t.format(**m.groupdict()) for t in templates)
                break
    choices = tuple(c for c in choices if c != item.query)
    if not choices:
        raise ValueError(f"no paraphrase template for query {item.query!r} (family {item.family!r})")
    return choices[random.Random(f"{seed}\x00{item.query}").randrange(len(choices))]


# ---- the experiment ------------------------------------------------------------------------------------
@dataclass
class CompressionResult:
    summary: pd.DataFrame  # one row per configuration: mean and 95 % CI over seeds
    per_seed: pd.DataFrame  # one row per (seed, configuration)
    answers: pd.DataFrame  # one row per (seed, configuration, eval question)
    figures: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    underpowered: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        def fmt(r, m, digits=3):
            mean, lo, hi = r[m], r[f"{m}_ci_low"], r[f"{m}_ci_high"]
            if math.isnan(mean):
                return "–"
            if math.isnan(lo):
                return f"{mean:.{digits}f}"
            return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

        head = ("| clusters | depth | retrieval | concepts | indexed nodes | ratio (nodes) | storage KiB | "
                "ratio (bytes) | vectors scored / query | context tokens | recall | answer quality | faithfulness |")
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for _, r in self.summary.iterrows():
            clusters = "–" if r["clusters"] == 0 else str(int(r["clusters"]))
            depth = "–" if r["depth"] == 0 else str(int(r["depth"]))
            lines.append(f"| {clusters} | {depth} | {r['mode']} | {r['concepts']:.1f} | {r['indexed_nodes']:.1f} | "
                         f"{r['ratio_nodes']:.2f} | {r['storage_bytes'] / 1024:.0f} | {r['ratio_bytes']:.3f} | "
                         f"{fmt(r, 'vectors_scored', 1)} | {r['context_tokens']:.1f} | {fmt(r, 'recall')} | "
                         f"{fmt(r, 'answer_quality')} | {fmt(r, 'faithfulness', 2)} |")
        note = (f"\n\nn = {self.params.get('n_eval')} held-out paraphrased questions per seed over "
                f"{self.params.get('n_seeds')} seeds, {self.params.get('n_interactions')} stored interactions, "
                f"token budget {self.params.get('token_budget')}; mean [95 % bootstrap CI over seeds].")
        if self.underpowered:
            note += " UNDERPOWERED: " + "; ".join(self.underpowered) + "."
        return "\n".join(lines) + note


def config_tag(clusters: int, depth: int, mode: str) -> str:
    return "flat" if clusters == 0 else f"c{clusters}_d{depth}_{mode}"


def underpowered_reasons(n_seeds: int, n_eval: int, n_stored: int, k_fetch: int) -> list[str]:
    reasons = []
    if n_seeds < MIN_SEEDS:
        reasons.append(f"{n_seeds} seed(s) < {MIN_SEEDS}")
    if n_eval < MIN_EVAL_QUERIES:
        reasons.append(f"{n_eval} questions per seed < {MIN_EVAL_QUERIES}")
    if n_stored <= k_fetch:
        reasons.append(f"{n_stored} stored interactions <= {k_fetch} nodes a first search fetches")
    return reasons


def run(config: Config, n_interactions: int = 300, cluster_counts: Sequence[int] = (4, 16),
        depths: Sequence[int] = (1, 2), *, seeds: Sequence[int] = (0, 1, 2, 3, 4), n_eval: int = 40,
        token_budget: int = 64, beam: int = 2, modes: Sequence[str] = ("descent", "collapsed"),
        families: Sequence[str] | None = None, summaries: str = "llm", answer_quality: bool = True,
        tier: str | None = None, max_tokens: int = 16, pool: Any = None, embedder: Any = None,
        work_dir: str | Path | None = None, tracker: Tracker | None = None,
        progress: bool = True) -> CompressionResult:
    """The compression experiment (module docstring).

    ``summaries``: ``"llm"`` (``tier`` writes each concept's subject) or ``"extractive"`` (key
    terms only, no model).  ``tier`` (summaries and answers) defaults to ``compression.tier`` or
    the first of ``inference.models``; no model is loaded when ``summaries="extractive"`` and
    ``answer_quality=False``.  Logs ``<config>/<metric>`` (mean over seeds) with
    ``<metric>_ci_low``/``_ci_high``, the tables as CSV, the markdown summary and ``ratio_recall.png``.
    """
    from tqdm.auto import tqdm

    from ..compression import RETRIEVAL_MODES, TreeRetriever, compress_memory, index_bytes, storage_bytes
    from ..memory import MemoryService
    from .routing import _make_pool, make_embedder

    tracker = tracker or NullTracker()
    if any(c < 2 for c in cluster_counts) or any(d < 1 for d in depths):
        raise ValueError("cluster_counts must be >= 2 and depths >= 1")
    if not seeds:
        raise ValueError("give at least one seed")
    bad = [m for m in modes if m not in RETRIEVAL_MODES]
    if bad or not modes:
        raise ValueError(f"modes {list(modes)!r}: allowed values are {', '.join(RETRIEVAL_MODES)}")
    if summaries not in ("llm", "extractive"):
        raise ValueError(f"summaries = {summaries!r}: allowed values are llm, extractive")
    if not 1 <= n_eval <= n_interactions:
        raise ValueError(f"n_eval ({n_eval}) must be in [1, n_interactions = {n_interactions}]")
    if n_interactions < 2 * max(cluster_counts):
        raise ValueError(f"{n_interactions} interactions are too few for {max(cluster_counts)} clusters")
    tier = tier or config.compression.tier or config.inference.models[0]
    needs_llm = summaries == "llm" or answer_quality
    params = {"experiment": "compression", "n_interactions": n_interactions,
              "cluster_counts": list(cluster_counts), "depths": list(depths), "seeds": list(seeds),
              "n_seeds": len(seeds), "n_eval": n_eval, "token_budget": token_budget, "beam": beam,
              "modes": list(modes), "summaries": summaries, "answer_quality": answer_quality,
              "tier": tier if needs_llm else None, "max_tokens": max_tokens if answer_quality else None,
              "families": list(families) if families else "all"}
    log_experiment(tracker, config, params)

    embedder = embedder or make_embedder(config)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="ruvllm-compression-"))
    work.mkdir(parents=True, exist_ok=True)
    own_pool = None
    if pool is None and needs_llm:
        own_pool = pool = _make_pool(config, [tier])
    per_seed, answers, k_fetch_seen = [], [], []
    n_configs = 1 + len(depths) * len(cluster_counts)
    bar = tqdm(total=len(seeds) * n_configs, desc="compression", disable=not progress)
    answer_cache: dict[tuple, tuple[str, bool]] = {}
    try:
        for seed in seeds:
            items = generate(families, n_interactions, seed, distinct=True)
            vectors = embedder.embed([interaction_text(it) for it in items])
            rng = np.random.default_rng(seed)
            eval_idx = np.sort(rng.choice(len(items), size=n_eval, replace=False))
            questions = [paraphrase(items[i], seed) for i in eval_idx]
            qvecs = embedder.embed(questions)

            def build(tag: str):
                mc = dataclasses.replace(config.memory, db_path=str(work / f"s{seed}-{tag}.db"),
                                         max_nodes=max(config.memory.max_nodes, 4 * len(items)))
                mem = MemoryService(mc, dimension=vectors.shape[1], embedder=embedder)
                ids = [mem.add(interaction_text(it), kind="interaction", vector=v, metadata={"family": it.family})
                       for it, v in zip(items, vectors)]
                return mem, ids

            def measure(retriever, ids, mode: str, tag: str) -> dict:
                hits, scored, tokens, correct = [], [], [], []
                for qi, question, qvec in zip(eval_idx, questions, qvecs):
                    r = retriever(qvec, mode)
                    hit = ids[qi] in r.node_ids
                    row = {"seed": seed, "config": tag, "question": question, "stored_query": items[qi].query,
                           "gold": items[qi].answer, "recall_hit": hit, "vectors_scored": r.vectors_scored,
                           "context_tokens": r.tokens, "context_nodes": len(r.node_ids)}
                    if answer_quality:
                        key = (question, tuple(r.texts))
                        if key not in answer_cache:
                            notes = "\n".join(f"- {t}" for t in r.texts)
                            g = pool.generate(tier, [{"role": "system", "content": ANSWER_SYSTEM},
                                                     {"role": "user", "content": f"Notes:\n{notes}\n\nQuestion: {question}"}],
                                              max_tokens=max_tokens, temperature=0.0)
                            answer_cache[key] = (g.text, is_correct(items[qi], g.text))
                        row["answer"], row["correct"] = answer_cache[key]
                        correct.append(row["correct"])
                    answers.append(row)
                    hits.append(hit)
                    scored.append(r.vectors_scored)
                    tokens.append(r.tokens)
                return {"recall": float(np.mean(hits)), "vectors_scored": float(np.mean(scored)),
                        "context_tokens": float(np.mean(tokens)),
                        "answer_quality": float(np.mean(correct)) if answer_quality else float("nan")}

            count_tokens = embedder.count_tokens
            mem, ids = build("flat")
            try:
                base_storage = storage_bytes(mem)
                retriever = TreeRetriever(mem, count_tokens, token_budget, beam)
                k_fetch_seen.append(retriever.k_fetch)
                t0 = time.perf_counter()
                per_seed.append({"seed": seed, "clusters": 0, "depth": 0, "mode": "flat", "concepts": 0,
                                 "indexed_nodes": len(mem.index), "ratio_nodes": 1.0,
                                 "storage_bytes": base_storage["storage_bytes"], "ratio_bytes": 1.0,
                                 "faithfulness": float("nan"), "compress_s": 0.0,
                                 **measure(retriever, ids, "descent", "flat"), "measure_s": time.perf_counter() - t0})
            finally:
                mem.close()
            bar.update()
            for depth in depths:
                for n_clusters in cluster_counts:
                    mem, ids = build(f"c{n_clusters}_d{depth}")
                    try:
                        cc = dataclasses.replace(config.compression, k_min=n_clusters, k_max=n_clusters,
                                                 max_depth=depth, archive_members=True, min_cluster_size=1, tier=tier)
                        t0 = time.perf_counter()
                        rep = compress_memory(mem, pool if summaries == "llm" else None, cc, tier=tier,
                                              embedder=embedder, seed=seed)
                        compress_s = time.perf_counter() - t0
                        after = storage_bytes(mem)
                        retriever = TreeRetriever(mem, count_tokens, token_budget, beam)
                        faith = rep.mean_faithfulness if rep.mean_faithfulness is not None else float("nan")
                        for mode in modes:
                            if mode == "collapsed":
                                index = retriever.collapsed_index()
                                indexed, stored = len(index), after["db_bytes"] + index_bytes(index)
                            else:
                                indexed, stored = len(mem.index), after["storage_bytes"]
                            t0 = time.perf_counter()
                            tag = config_tag(n_clusters, depth, mode)
                            per_seed.append({"seed": seed, "clusters": n_clusters, "depth": depth, "mode": mode,
                                             "concepts": len(rep.concepts), "indexed_nodes": indexed,
                                             "ratio_nodes": len(items) / max(1, indexed), "storage_bytes": stored,
                                             "ratio_bytes": base_storage["storage_bytes"] / stored,
                                             "faithfulness": faith, "compress_s": compress_s,
                                             **measure(retriever, ids, mode, tag),
                                             "measure_s": time.perf_counter() - t0})
                    finally:
                        mem.close()
                    bar.update()
    finally:
        bar.close()
        if own_pool is not None:
            own_pool.close()

    per_seed_df = pd.DataFrame(per_seed)
    summary = summarise(per_seed_df)
    result = CompressionResult(summary, per_seed_df, pd.DataFrame(answers), params=params)
    result.underpowered = underpowered_reasons(len(seeds), n_eval, n_interactions, max(k_fetch_seen))
    if result.underpowered:
        warnings.warn("compression run is underpowered: " + "; ".join(result.underpowered), stacklevel=2)
    set_tags = getattr(tracker, "set_tags", None)
    if callable(set_tags):
        set_tags({"underpowered": str(bool(result.underpowered)).lower(),
                  **({"underpowered_reasons": "; ".join(result.underpowered)} if result.underpowered else {})})
    result.figures = {"ratio_recall": plot_ratio_recall(result)}
    for row in summary.to_dict("records"):
        tag = config_tag(int(row["clusters"]), int(row["depth"]), row["mode"])
        tracker.log_metrics({f"{tag}/{k}": float(v) for k, v in row.items()
                             if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
                             and k not in ("clusters", "depth")})
    tracker.log_table(result.summary, "compression_summary.csv")
    tracker.log_table(result.per_seed, "compression_per_seed.csv")
    tracker.log_table(result.answers, "compression_answers.csv")
    tracker.log_text(result.to_markdown(), "compression_summary.md")
    for name, fig in result.figures.items():
        tracker.log_figure(fig, f"{name}.png")
    return result


def summarise(per_seed: pd.DataFrame) -> pd.DataFrame:
    """One row per (clusters, depth, mode): mean and 95 % bootstrap CI over seeds of every metric."""
    rows = []
    for (clusters, depth, mode), g in per_seed.groupby(["clusters", "depth", "mode"], sort=False):
        row: dict[str, Any] = {"clusters": int(clusters), "depth": int(depth), "mode": mode, "n_seeds": len(g)}
        for m in METRICS:
            mean, lo, hi = bootstrap_ci(g[m].astype(float).tolist())
            if g[m].notna().sum() < 2:  # one replicate: no spread to estimate
                lo = hi = float("nan")
            row[m], row[f"{m}_ci_low"], row[f"{m}_ci_high"] = mean, lo, hi
        rows.append(row)
    return pd.DataFrame(rows)


def plot_ratio_recall(result: CompressionResult):
    """Compression ratio (indexed nodes) against recall, 95 % CI bars, one series per retrieval mode."""
    import matplotlib.pyplot as plt

    s = result.summary
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for (mode, depth), d in s.groupby(["mode", "depth"], sort=False):
        label = "flat (uncompressed)" if mode == "flat" else f"{mode}, depth {depth}"
        yerr = np.array([d["recall"] - d["recall_ci_low"], d["recall_ci_high"] - d["recall"]])
        ax.errorbar(d["ratio_nodes"], d["recall"], yerr=np.nan_to_num(yerr), marker="o", capsize=3,
                    ls="-" if mode != "flat" else "", label=label)
        for _, r in d.iterrows():
            if r["clusters"]:
                ax.annotate(f"{int(r['clusters'])} clusters", (r["ratio_nodes"], r["recall"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (indexed nodes before / after, log)")
    ax.set_ylabel(f"recall at a {result.params.get('token_budget')}-token budget")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
