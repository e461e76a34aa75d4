"""Inference benchmark: per tier TTFT and decode rate, pool overhead vs raw llama.cpp, KV-reuse speed-up.

    python benches/inference.py [--tiers smollm2-135m qwen2.5-coder-0.5b] [--runs 5] [--max-tokens 64]

* TTFT / decode tok/s: greedy generation of `--max-tokens` tokens from a cold context.
* Overhead: the pool's median end-to-end latency against `llama_cpp.Llama.create_completion`
  on the same prompt text, threads, context size and greedy sampling (runs interleaved,
  both from a cold context).  Target: <= 5 %.
* KV reuse: a two-turn chat; the second turn with its session (prefix reused) against the
  same second-turn prompt cold.  Reports prompt tokens evaluated and the TTFT speed-up.

Prints a markdown table and writes benches/results/inference.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ruvllm_lab import models  # noqa: E402
from ruvllm_lab.config import InferenceConfig, SystemConfig  # noqa: E402
from ruvllm_lab.inference import InferencePool  # noqa: E402
from ruvllm_lab.inference.llama_cpp_backend import resolve_threads  # noqa: E402
from ruvllm_lab.inference.prompts import build_prompt, normalize_messages  # noqa: E402

PROMPT = "Write a long story about a dragon who learns to cook."
TURN1 = [{"role": "user", "content": "I am planning a trip to Japan in spring. What three cities should I visit, and why?"}]
TURN2_USER = "Which of those is best for food?"


def direct_run(llm, prompt_text: str, max_tokens: int) -> dict:
    """Raw llama-cpp-python from a cold context: TTFT from the first streamed chunk."""
    llm.reset()
    t0 = time.perf_counter()
    ttft, n = None, 0
    for chunk in llm.create_completion(prompt_text, max_tokens=max_tokens, temperature=0.0, stream=True):
        if chunk["choices"][0]["finish_reason"] is not None:
            continue  # the closing chunk carries no token
        if ttft is None:
            ttft = time.perf_counter() - t0
        n += 1
    total = time.perf_counter() - t0
    return {"ttft_ms": ttft * 1e3, "latency_ms": total * 1e3, "chunks": n,
            "tokens_per_s": (n - 1) / (total - ttft) if n > 1 else 0.0}


def bench_tier(tier: str, runs: int, max_tokens: int, n_threads: int, n_ctx: int) -> dict:
    from llama_cpp import Llama

    cfg = InferenceConfig(models=[tier], max_context=n_ctx, n_threads=n_threads, max_loaded_models=1,
                          kv_cache_sessions=4)
    pool = InferencePool(cfg, SystemConfig(max_memory_mb=4096))
    pool.generate(tier, "Hello", temperature=0.0, max_tokens=4)  # load + warm up
    backend = pool._resident[tier]
    prompt_text, _ = build_prompt(normalize_messages(PROMPT), backend.spec.prompt_format, backend.template)
    threads = resolve_threads(n_threads)
    llm = Llama(model_path=str(models.model_path(tier)), n_ctx=n_ctx, n_batch=min(512, n_ctx), n_threads=threads,
                n_threads_batch=threads, logits_all=False, verbose=False)
    direct_run(llm, prompt_text, 4)  # warm up

    pool_runs, direct_runs = [], []
    for _ in range(runs):  # interleaved so drift (other load on the machine) hits both alike
        direct_runs.append(direct_run(llm, prompt_text, max_tokens))
        g = pool.generate(tier, PROMPT, temperature=0.0, max_tokens=max_tokens)
        pool_runs.append({"ttft_ms": g.ttft_ms, "latency_ms": g.latency_ms, "tokens_per_s": g.tokens_per_s,
                          "completion_tokens": g.completion_tokens, "prompt_tokens": g.prompt_tokens})
    llm.close()

    # second turn with and without the session's KV prefix
    reuse = []
    for i in range(runs):
        sid = f"bench-{i}"
        first = pool.generate(tier, TURN1, temperature=0.0, max_tokens=48, session_id=sid)
        turn2 = TURN1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": TURN2_USER}]
        pool.generate(tier, "Unrelated question: what is 2+2?", temperature=0.0, max_tokens=4)  # evicts the live context
        warm = pool.generate(tier, turn2, temperature=0.0, max_tokens=8, session_id=sid)
        cold = pool.generate(tier, turn2, temperature=0.0, max_tokens=8)
        reuse.append({"warm_ttft_ms": warm.ttft_ms, "cold_ttft_ms": cold.ttft_ms,
                      "warm_evaluated": warm.prompt_tokens_evaluated, "cold_evaluated": cold.prompt_tokens_evaluated})
    pool.close()

    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    pool_lat, direct_lat = med(pool_runs, "latency_ms"), med(direct_runs, "latency_ms")
    return {
        "tier": tier, "threads": threads, "n_ctx": n_ctx, "runs": runs, "max_tokens": max_tokens,
        "prompt_tokens": pool_runs[0]["prompt_tokens"], "completion_tokens": pool_runs[0]["completion_tokens"],
        "direct_completion_chunks": direct_runs[0]["chunks"],
        "pool_ttft_ms": med(pool_runs, "ttft_ms"), "pool_decode_tok_s": med(pool_runs, "tokens_per_s"),
        "pool_latency_ms": pool_lat,
        "direct_ttft_ms": med(direct_runs, "ttft_ms"), "direct_decode_tok_s": med(direct_runs, "tokens_per_s"),
        "direct_latency_ms": direct_lat,
        "overhead_pct": 100.0 * (pool_lat - direct_lat) / direct_lat,
        "turn2_cold_evaluated": med(reuse, "cold_evaluated"), "turn2_warm_evaluated": med(reuse, "warm_evaluated"),
        "turn2_cold_ttft_ms": med(reuse, "cold_ttft_ms"), "turn2_warm_ttft_ms": med(reuse, "warm_ttft_ms"),
        "kv_reuse_ttft_speedup": med(reuse, "cold_ttft_ms") / med(reuse, "warm_ttft_ms"),
        "pool_runs": pool_runs, "direct_runs": direct_runs, "reuse_runs": reuse,
    }


def machine() -> dict:
    import llama_cpp
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "llama_cpp_python": llama_cpp.__version__}


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"# Inference benchmark ({meta['date']})", "",
             f"Machine: {meta['machine']['processor']}, {meta['machine']['cpu_count']} CPUs, "
             f"{meta['machine']['platform']}, llama-cpp-python {meta['machine']['llama_cpp_python']}. "
             f"Greedy, {results[0]['max_tokens']} new tokens, n_ctx={results[0]['n_ctx']}, "
             f"median of {results[0]['runs']} runs; command: `{meta['command']}`.", "",
             "| tier | threads | prompt tok | TTFT ms (pool / direct) | decode tok/s (pool / direct) "
             "| latency ms (pool / direct) | pool overhead | turn-2 prompt tok evaluated (warm / cold) "
             "| turn-2 TTFT ms (warm / cold) | KV-reuse TTFT speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['tier']} | {r['threads']} | {r['prompt_tokens']} | {r['pool_ttft_ms']:.0f} / {r['direct_ttft_ms']:.0f} "
            f"| {r['pool_decode_tok_s']:.1f} / {r['direct_decode_tok_s']:.1f} "
            f"| {r['pool_latency_ms']:.0f} / {r['direct_latency_ms']:.0f} | {r['overhead_pct']:+.1f} % "
            f"| {r['turn2_warm_evaluated']:.0f} / {r['turn2_cold_evaluated']:.0f} "
            f"| {r['turn2_warm_ttft_ms']:.0f} / {r['turn2_cold_ttft_ms']:.0f} | {r['kv_reuse_ttft_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiers", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=ROOT / "benches" / "results")
    args = ap.parse_args(argv)

    results = [bench_tier(t, args.runs, args.max_tokens, args.threads, args.n_ctx) for t in args.tiers]
    meta = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
            "command": "python benches/inference.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    md = markdown(results, meta)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inference.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (args.out / "inference.md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
