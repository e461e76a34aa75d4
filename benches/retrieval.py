"""Retrieval embeddings by measurement: does a memory about *this* question get through the gate?

For each embedding model: calibrate ``retrieval.relevance_threshold`` on the calib split of
``data/memory_eval.jsonl`` (at most 1 % of unrelated pairs above it), then score the gate on the
held-out eval split: precision, recall and false-positive rate over paraphrase pairs (related)
and other-question pairs (unrelated, many of the same family and template), by cosine alone
and by cosine + key terms (the shipped gate).  Also the embedding time per query.

    .venv/bin/python benches/retrieval.py [--encoders minilm llm-encoder] [--out benches/results/retrieval]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ruvllm_lab.config import Config  # noqa: E402
from ruvllm_lab.embedding import EmbeddingService  # noqa: E402
from ruvllm_lab.relevance import calibrate, cosines, gate_scores, load_memory_eval, question_pairs  # noqa: E402

ENCODERS = {
    "minilm": {"embedding.model": "all-minilm-l6-v2", "embedding.dimension": 384},
    "llm-encoder": {"embedding.model": "llm-encoder", "embedding.encoder_tier": "qwen2.5-coder-0.5b",
                    "embedding.dimension": 768},
}


def measure(name: str, max_fpr: float) -> list[dict]:
    from ruvllm_lab.inference import InferencePool
    cfg = Config.load(ROOT / "configs" / "server-cpu.toml", overrides=ENCODERS[name])
    pool = InferencePool(cfg.inference, cfg.system) if cfg.embedding.model == "llm-encoder" else None
    try:
        embedder = EmbeddingService(cfg.embedding, pool=pool, device="cpu")
        cal = calibrate(embedder.embed, max_fpr)
        pairs = question_pairs(load_memory_eval(split="eval"))
        cos = cosines(embedder.embed, pairs)
        queries = [r["question"] for r in load_memory_eval(split="eval")]
        embedder.clear_cache()
        t0 = time.perf_counter()
        for q in queries:
            embedder.embed_one(q)
        ms = (time.perf_counter() - t0) * 1000 / len(queries)
    finally:
        if pool is not None:
            pool.close()
    rows = []
    for gate, key_terms in (("cosine", False), ("cosine + key terms", True)):
        s = gate_scores(cos, pairs, cal["threshold"], key_terms)
        rows.append({"encoder": name, "dimension": cfg.embedding.dimension, "gate": gate,
                     "threshold": cal["threshold"], "calib_recall": cal["recall"], **s, "embed_ms": ms})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    ap.add_argument("--max-false-positive-rate", type=float, default=0.01)
    ap.add_argument("--out", default=str(ROOT / "benches" / "results" / "retrieval"))
    args = ap.parse_args(argv)
    rows = [r for name in args.encoders for r in measure(name, args.max_false_positive_rate)]
    head = ("| encoder | dim | gate | threshold (calib) | precision | recall | false-positive rate | "
            "related / unrelated pairs | embed ms/query |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head] + [f"| {r['encoder']} | {r['dimension']} | {r['gate']} | {r['threshold']:.3f} | "
                      f"{r['precision']:.3f} | {r['recall']:.3f} | {r['false_positive_rate']:.4f} | "
                      f"{r['n_related']} / {r['n_unrelated']} | {r['embed_ms']:.1f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"max_false_positive_rate": args.max_false_positive_rate,
                                                    "split": "eval", "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        "Relevance gate on held-out question pairs (data/memory_eval.jsonl, eval split; threshold calibrated on "
        f"the calib split at <= {args.max_false_positive_rate:.0%} unrelated pairs passing).\n"
        "Command: `.venv/bin/python benches/retrieval.py`\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
