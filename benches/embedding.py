"""MiniLM query embedding by runtime: onnxruntime vs sentence-transformers/torch, same weights.

Per runtime and intra-op thread count: single-query latency (P50/P99 over distinct real questions,
LRU cache off, so every call runs the model), batch throughput (texts/s at ``--batch``), load time
(export cached), and how far its vectors are from torch's on the same texts (max |diff|, min cosine).
The request path embeds one query at a time, so single-query P50 is what the orchestration
overhead pays.  Writes ``benches/results/embedding.{md,json}``.

``--int8`` adds the ``onnx-int8`` runtime (the same export, int8 MatMul weights): its latency, its
vectors against fp32 onnx, and the relevance gate's decisions on every question pair of
``data/memory_eval.jsonl`` at the edge profile's ``retrieval.relevance_threshold`` (how many pairs
change side, and the gate's recall and false-positive rate with either runtime's vectors).

    flock /tmp/ruvllm-heavy.lock .venv/bin/python benches/embedding.py [--threads 1 2] [--repeats 3] [--int8]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ruvllm_lab.config import Config, EmbeddingConfig  # noqa: E402
from ruvllm_lab.embedding import EmbeddingService  # noqa: E402
from ruvllm_lab.experiments.metrics import median_ci  # noqa: E402
from ruvllm_lab.relevance import cosines, gate_scores, load_memory_eval, question_pairs  # noqa: E402

RUNTIMES = ("onnx", "torch")


def real_queries() -> list[str]:
    """Distinct questions a user might ask: the memory-eval questions, their paraphrases and the corpus'."""
    texts = []
    for r in load_memory_eval():
        texts += [r["question"], *r["paraphrases"]]
    texts += [json.loads(line)["question"] for line in (ROOT / "data/knowledge.jsonl").read_text().splitlines()
              if line.strip()]
    return list(dict.fromkeys(texts))


def measure(runtime: str, threads: int, texts: list[str], batch: int, repeats: int) -> tuple[dict, np.ndarray]:
    t0 = time.perf_counter()
    svc = EmbeddingService(EmbeddingConfig(runtime=runtime, threads=threads, cache_size=0, batch_size=batch))
    svc.embed_one("warm up")
    load_s = time.perf_counter() - t0
    for t in texts[:20]:  # warm the allocator / kernels
        svc.embed_one(t)
    single = []
    for _ in range(repeats):
        for t in texts:
            s = time.perf_counter_ns()
            svc.embed_one(t)
            single.append(time.perf_counter_ns() - s)
    ms = np.asarray(single) / 1e6
    s = time.perf_counter()
    vecs = svc.embed(texts)  # batch_size rows per backend call
    batch_s = time.perf_counter() - s
    row = {"runtime": runtime, "threads": threads, "load_s": round(load_s, 3), "n_single": len(single),
           "single_p50_ms": round(float(np.percentile(ms, 50)), 3),
           "single_p50_ci_ms": [round(x, 3) for x in median_ci(ms)[1:]],
           "single_p99_ms": round(float(np.percentile(ms, 99)), 3),
           "single_mean_ms": round(float(ms.mean()), 3),
           "batch": batch, "batch_texts_per_s": round(len(texts) / batch_s, 1)}
    return row, vecs


def int8_comparison(texts: list[str], threads: int) -> dict:
    """embedding.runtime 'onnx-int8' against 'onnx' (fp32): vectors, and the relevance gate's decisions."""
    def one_by_one(runtime: str):  # int8 scales activations per call: a query is embedded alone when served
        svc = EmbeddingService(EmbeddingConfig(runtime=runtime, threads=threads, cache_size=0))
        return lambda batch: np.stack([svc.embed_one(t) for t in batch])

    fp32, int8 = one_by_one("onnx"), one_by_one("onnx-int8")
    a, b = fp32(texts), int8(texts)
    pairs = question_pairs(load_memory_eval())
    retrieval = Config.load(ROOT / "configs" / "edge.toml").retrieval
    cos_fp32, cos_int8 = cosines(fp32, pairs), cosines(int8, pairs)
    threshold = retrieval.relevance_threshold
    flips = (cos_fp32 >= threshold) != (cos_int8 >= threshold)
    return {"threads": threads, "cosine_vs_fp32_min": float(np.sum(a * b, axis=1).min()),
            "cosine_vs_fp32_median": float(np.median(np.sum(a * b, axis=1))),
            "pair_cosine_max_abs_change": float(np.abs(cos_fp32 - cos_int8).max()),
            "relevance_threshold": threshold, "pairs": int(len(flips)), "pairs_changing_side": int(flips.sum()),
            "gate_fp32": gate_scores(cos_fp32, pairs, threshold, retrieval.match_key_terms),
            "gate_int8": gate_scores(cos_int8, pairs, threshold, retrieval.match_key_terms)}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def render(report: dict) -> str:
    m = report["meta"]
    lines = ["# Query embedding: onnxruntime vs torch (all-MiniLM-L6-v2)", "",
             f"{m['date']}, commit {m['git_commit']}, {m['machine']['cpu']} ({m['machine']['cores']} cores), "
             f"load average before/after {m['loadavg_before']} / {m['loadavg_after']}; "
             f"{report['n_texts']} distinct real questions x {report['repeats']} repeats, cache off.", "",
             f"`{m['command']}`", "",
             "| runtime | threads | single P50 ms [95 % CI] | single P99 ms | mean ms | batch | texts/s (batched) | load s | "
             "max abs diff vs torch | min cosine vs torch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lo, hi = r["single_p50_ci_ms"]
        lines.append(f"| {r['runtime']} | {r['threads']} | {r['single_p50_ms']} [{lo}, {hi}] | {r['single_p99_ms']} | "
                     f"{r['single_mean_ms']} | {r['batch']} | {r['batch_texts_per_s']} | {r['load_s']} | "
                     f"{r['max_abs_diff_vs_torch']:.2e} | {r['min_cosine_vs_torch']:.7f} |")
    for t, s in report["speedup_p50"].items():
        lines.append("")
        lines.append(f"Single-query P50 speed-up of onnx over torch at {t} thread(s): {s:.2f}x.")
    q = report.get("int8")
    if q:
        lines += ["", f"## onnx-int8 against onnx (fp32), {q['threads']} thread(s)", "",
                  "The onnx-int8 row's 'vs torch' columns measure quantisation error, not a defect.  "
                  f"Cosine to the fp32 vector of the same text: min {q['cosine_vs_fp32_min']:.4f}, median "
                  f"{q['cosine_vs_fp32_median']:.4f}; largest change of a question pair's cosine "
                  f"{q['pair_cosine_max_abs_change']:.4f}.  At relevance_threshold {q['relevance_threshold']}, "
                  f"{q['pairs_changing_side']} of {q['pairs']} memory-eval question pairs change side.", "",
                  "| vectors | gate recall | gate false-positive rate | precision |", "|---|---|---|---|"]
        for name in ("fp32", "int8"):
            g = q[f"gate_{name}"]
            lines.append(f"| {name} | {g['recall']:.4f} | {g['false_positive_rate']:.5f} | {g['precision']:.4f} |")
    lines += ["", "One run on a machine shared with other jobs: latencies are indicative; the vector "
              "difference is exact."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="intra-op thread counts (embedding.threads)")
    ap.add_argument("--repeats", type=int, default=3, help="passes over the query set for the latency samples")
    ap.add_argument("--batch", type=int, default=32, help="texts per backend call in the throughput run")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N texts (0 = all)")
    ap.add_argument("--int8", action="store_true", help="also measure a dynamic int8 quantisation (docstring)")
    ap.add_argument("--out", default=str(ROOT / "benches" / "results"))
    args = ap.parse_args(argv)
    texts = real_queries()
    if args.limit:
        texts = texts[:args.limit]
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows, vectors = [], {}
    for threads in args.threads:
        for runtime in RUNTIMES + (("onnx-int8",) if args.int8 else ()):
            row, vecs = measure(runtime, threads, texts, args.batch, args.repeats)
            rows.append(row)
            vectors[(runtime, threads)] = vecs
            print(f"{runtime:6s} threads={threads}: P50 {row['single_p50_ms']} ms, P99 {row['single_p99_ms']} ms, "
                  f"{row['batch_texts_per_s']} texts/s", flush=True)
    reference = vectors[("torch", args.threads[0])]
    for row in rows:
        v = vectors[(row["runtime"], row["threads"])]
        row["max_abs_diff_vs_torch"] = float(np.abs(v - reference).max())
        row["min_cosine_vs_torch"] = float(np.sum(v * reference, axis=1).min())
    speedup = {}
    for t in args.threads:
        by = {r["runtime"]: r for r in rows if r["threads"] == t}
        speedup[str(t)] = by["torch"]["single_p50_ms"] / by["onnx"]["single_p50_ms"]
    report = {"meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
                       "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                   "platform": platform.platform()},
                       "command": "python benches/embedding.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
              "n_texts": len(texts), "repeats": args.repeats, "rows": rows, "speedup_p50": speedup}
    if args.int8:
        report["int8"] = int8_comparison(texts, args.threads[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "embedding.json").write_text(json.dumps(report, indent=2) + "\n")
    md = render(report)
    (out / "embedding.md").write_text(md)
    print(md)
    return report


if __name__ == "__main__":
    main()
