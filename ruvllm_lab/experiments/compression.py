"""Compression experiment: how much memory can concept compression save, and what does it cost?

A memory holds N past interactions (``"Q: <query> A: <gold answer>"``, one node each, from
a generated workload).  For every (cluster count k, depth d) a fresh copy of that memory is
compressed with ``ruvllm_lab.compression.compress_memory`` (``k_min = k_max = k``,
``max_depth = d``, members archived so the index really shrinks), then measured on
``n_eval`` of the stored queries:

* **compression ratio** = active (indexed) nodes before / after; also index bytes before/after;
* **recall@k** (``recall``) -- the node holding the query's answer is among the notes handed
  to the answering tier: a plain top-k hit, or one of the ``members_per_concept`` leaves
  reached by descending from a concept hit to its child nearest the query (RAPTOR tree
  traversal, beam 1); ``recall_reachable`` is the looser test of ``compress_memory`` (the
  answer node is a transitive member of a concept hit);
* **answer quality** -- ``tier`` answers the query with the retrieved notes as context
  (a concept hit contributes its summary and its ``members_per_concept`` members nearest to
  the query); gold-matched like the routing experiment.

The row ``k = 0, depth = 0`` is the uncompressed memory (ratio 1).
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..config import Config
from ..workloads import WorkItem, generate
from .tracking import NullTracker, Tracker, log_config

ANSWER_SYSTEM = "Use the notes to answer the question. Answer with only the answer, no explanation."


def interaction_text(item: WorkItem) -> str:
    return f"Q: {item.query} A: {item.answer}"


@dataclass
class CompressionResult:
    summary: pd.DataFrame  # one row per (clusters, depth), plus the uncompressed baseline
    answers: pd.DataFrame  # one row per (clusters, depth, eval query)
    figures: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def to_markdown(self) -> str:
        from .routing import _markdown
        cols = ["clusters", "depth", "concepts", "nodes_before", "nodes_after", "compression_ratio", "recall",
                "recall_reachable", "answer_quality", "faithfulness"]
        return _markdown(self.summary[[c for c in cols if c in self.summary]])


def _descend(memory: Any, qvec: np.ndarray, concepts: dict[int, list[int]], concept_id: int) -> list[int]:
    """Tree traversal (RAPTOR, beam 1): from a concept, follow the child nearest the query down to
    the lowest concept; return that concept's leaf members, nearest to the query first."""
    children = concepts[concept_id]
    sims = np.array([float(memory.vector(c) @ qvec) for c in children])
    order = [children[i] for i in np.argsort(-sims)]
    sub = [c for c in order if c in concepts]
    if sub:
        return _descend(memory, qvec, concepts, sub[0])
    return order


def _context(memory: Any, qvec: np.ndarray, k: int, concepts: dict[int, list[int]],
             members_per_concept: int) -> tuple[list[str], set[int]]:
    """Texts handed to the answering tier, and the leaf node ids among them (for recall).

    A plain hit contributes its text; a concept hit its summary plus the
    ``members_per_concept`` leaves ``_descend`` finds under it.
    """
    texts, reached = [], set()
    for hit in memory.search(qvec, k):
        texts.append(hit.text)
        if hit.node_id in concepts:
            for leaf in _descend(memory, qvec, concepts, hit.node_id)[:members_per_concept]:
                reached.add(leaf)
                texts.append(memory.get(leaf).text)
        else:
            reached.add(hit.node_id)
    return texts, reached


def run(config: Config, n_interactions: int = 60, cluster_counts: Sequence[int] = (2, 4, 8),
        depths: Sequence[int] = (1, 2), *, workload: Sequence[WorkItem] | None = None,
        families: Sequence[str] | None = None, n_eval: int = 12, k: int = 5, members_per_concept: int = 2,
        answer_quality: bool = True, tier: str | None = None, max_tokens: int = 24, seed: int = 0,
        pool: Any = None, embedder: Any = None, work_dir: str | Path | None = None,
        tracker: Tracker | None = None) -> CompressionResult:
    """The compression experiment (module docstring).  ``tier`` (summaries and answers) defaults
    to ``compression.tier`` or the first of ``inference.models``.

    Logs ``c<k>_d<depth>/<metric>`` per configuration, ``baseline/<metric>``, the tables as CSV
    and the figure ``ratio_recall.png``.
    """
    from ..compression import compress_memory
    from ..memory import MemoryService
    from .routing import _make_pool, judge_correct, make_embedder

    tracker = tracker or NullTracker()
    if any(c < 1 for c in cluster_counts) or any(d < 1 for d in depths):
        raise ValueError("cluster_counts and depths must be >= 1")
    items = list(workload) if workload is not None else generate(families, n_interactions, seed)
    items = list({it.query: it for it in items}.values())  # one node per distinct query
    if len(items) < 2 * max(cluster_counts):
        raise ValueError(f"{len(items)} distinct interactions are too few for {max(cluster_counts)} clusters")
    tier = tier or config.compression.tier or config.inference.models[0]
    n_eval = min(n_eval, len(items))
    params = {"experiment": "compression", "n_interactions": len(items), "cluster_counts": ",".join(map(str, cluster_counts)),
              "depths": ",".join(map(str, depths)), "n_eval": n_eval, "k": k, "tier": tier,
              "members_per_concept": members_per_concept, "answer_quality": answer_quality, "seed": seed}
    log_config(tracker, config)
    tracker.log_params({f"exp.{k_}": v for k_, v in params.items()})

    embedder = embedder or make_embedder(config)
    vectors = embedder.embed([interaction_text(it) for it in items])
    rng = np.random.default_rng(seed)
    eval_idx = np.sort(rng.choice(len(items), size=n_eval, replace=False))
    eval_vecs = embedder.embed([items[i].query for i in eval_idx])
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="ruvllm-compression-"))
    work.mkdir(parents=True, exist_ok=True)
    own_pool = None
    if pool is None:
        own_pool = pool = _make_pool(config, [tier])

    def build_memory(tag: str) -> tuple[Any, list[int]]:
        mc = dataclasses.replace(config.memory, db_path=str(work / f"memory-{tag}.db"), max_nodes=max(
            config.memory.max_nodes, 4 * len(items)))
        mem = MemoryService(mc, dimension=vectors.shape[1], embedder=embedder)
        ids = [mem.add(interaction_text(it), kind="interaction", vector=v, metadata={"family": it.family})
               for it, v in zip(items, vectors)]
        return mem, ids

    def measure(tag: str, mem: Any, ids: list[int], concepts: dict[int, list[int]]) -> tuple[float, float, list[dict]]:
        recall_hits, rows = 0, []
        for qi, qvec in zip(eval_idx, eval_vecs):
            texts, reached = _context(mem, qvec, k, concepts, members_per_concept)
            hit = ids[qi] in reached
            recall_hits += hit
            row = {"config": tag, "query": items[qi].query, "gold": items[qi].answer, "recall_hit": hit}
            if answer_quality:
                notes = "\n".join(f"- {t}" for t in texts)
                g = pool.generate(tier, [{"role": "system", "content": ANSWER_SYSTEM},
                                         {"role": "user", "content": f"Notes:\n{notes}\n\nQuestion: {items[qi].query}"}],
                                  max_tokens=max_tokens, temperature=0.0)
                row.update(answer=g.text, correct=judge_correct(items[qi], g.text))
            rows.append(row)
        quality = float(np.mean([r["correct"] for r in rows])) if answer_quality else float("nan")
        return recall_hits / n_eval, quality, rows

    summary, answers = [], []
    try:
        mem, ids = build_memory("baseline")
        t0 = time.perf_counter()
        recall, quality, rows = measure("baseline", mem, ids, {})
        st = mem.stats()
        summary.append({"clusters": 0, "depth": 0, "concepts": 0, "nodes_before": st["nodes"], "nodes_after": st["nodes"],
                        "compression_ratio": 1.0, "index_bytes_before": st["index_bytes"],
                        "index_bytes_after": st["index_bytes"], "recall": recall, "recall_reachable": recall,
                        "answer_quality": quality, "faithfulness": float("nan"), "compress_s": 0.0,
                        "measure_s": time.perf_counter() - t0})
        answers += rows
        mem.close()
        for depth in depths:
            for n_clusters in cluster_counts:
                tag = f"c{n_clusters}_d{depth}"
                mem, ids = build_memory(tag)
                cc = dataclasses.replace(config.compression, k_min=n_clusters, k_max=n_clusters, max_depth=depth,
                                         archive_members=True, min_cluster_size=1, tier=tier)
                t0 = time.perf_counter()
                rep = compress_memory(mem, pool, cc, tier=tier, embedder=embedder,
                                      eval_queries=[(eval_vecs[j], [ids[i]]) for j, i in enumerate(eval_idx)],
                                      recall_k=k, seed=seed)
                compress_s = time.perf_counter() - t0
                concepts = {c.node_id: list(c.member_ids) for c in rep.concepts}
                t0 = time.perf_counter()
                recall, quality, rows = measure(tag, mem, ids, concepts)
                st = mem.stats()
                summary.append({
                    "clusters": n_clusters, "depth": depth, "concepts": len(rep.concepts),
                    "nodes_before": rep.nodes_before, "nodes_after": st["nodes"],
                    "compression_ratio": rep.nodes_before / max(1, st["nodes"]),
                    "index_bytes_before": rep.index_bytes_before, "index_bytes_after": st["index_bytes"],
                    "recall": recall,
                    "recall_reachable": (rep.recall_after_collapsed if rep.recall_after_collapsed is not None
                                         else float("nan")),
                    "answer_quality": quality,
                    "faithfulness": rep.mean_faithfulness if rep.mean_faithfulness is not None else float("nan"),
                    "compress_s": compress_s, "measure_s": time.perf_counter() - t0})
                answers += rows
                mem.close()
    finally:
        if own_pool is not None:
            own_pool.close()

    result = CompressionResult(pd.DataFrame(summary), pd.DataFrame(answers), params=params)
    result.figures = {"ratio_recall": plot_ratio_recall(result)}
    for row in result.summary.to_dict("records"):
        tag = "baseline" if row["clusters"] == 0 else f"c{row['clusters']}_d{row['depth']}"
        tracker.log_metrics({f"{tag}/{k_}": v for k_, v in row.items() if isinstance(v, (int, float))
                             and not isinstance(v, bool)})
    tracker.log_table(result.summary, "compression_summary.csv")
    tracker.log_table(result.answers, "compression_answers.csv")
    tracker.log_text(result.to_markdown(), "compression_summary.md")
    for name, fig in result.figures.items():
        tracker.log_figure(fig, f"{name}.png")
    return result


def plot_ratio_recall(result: CompressionResult):
    """Compression ratio against recall@k and answer quality, one marker per configuration."""
    import matplotlib.pyplot as plt

    s = result.summary
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for depth, d in s.groupby("depth"):
        label = "uncompressed" if depth == 0 else f"depth {depth}"
        ax.plot(d["compression_ratio"], d["recall"], marker="o", ls="-" if depth else "", label=f"recall, {label}")
        if d["answer_quality"].notna().any():
            ax.plot(d["compression_ratio"], d["answer_quality"], marker="s", ls="--" if depth else "",
                    label=f"answer quality, {label}")
        for _, r in d.iterrows():
            if r["clusters"]:
                ax.annotate(f"k={int(r['clusters'])}", (r["compression_ratio"], r["recall"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("compression ratio (indexed nodes before / after)")
    ax.set_ylabel("recall@k / answer quality")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
