"""Batched decode in the transformers backend: aggregate tokens/s with 1, 2, 4, 8 concurrent clients.

Each client sends the same number of greedy requests with a fixed token budget (distinct prompts, no
stop: `ignore` of end tokens is not possible through the pool, so completion tokens are counted as
produced).  The backend decodes concurrent requests in one left-padded batch per step; with one client
every step holds one sequence.  Writes ``benches/results/transformers_batching.{md,json}``.

    flock /tmp/ruvllm-heavy.lock .venv/bin/python benches/transformers_batching.py [--device cpu] [--clients 1 2 4 8]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ruvllm_lab.config import InferenceConfig, SystemConfig  # noqa: E402
from ruvllm_lab.inference import InferencePool  # noqa: E402

PROMPTS = ["Write a story about a dragon who learns to cook.", "Describe the sea at night.",
           "Explain how bees make honey.", "Tell me about the history of Paris.",
           "Write a poem about autumn leaves.", "Describe a walk through a forest.",
           "Explain why the sky is blue.", "Tell a story about a lost cat."]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tier", default="smollm2-135m")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benches" / "results"))
    args = ap.parse_args(argv)
    cfg = InferenceConfig(models=[args.tier], backend="transformers", device=args.device, max_context=512,
                          max_batch_sequences=max(args.clients), kv_cache_sessions=0)
    pool = InferencePool(cfg, SystemConfig(max_memory_mb=8192))
    rows = []
    try:
        pool.generate(args.tier, "Hi", temperature=0.0, max_tokens=2)  # load
        backend = pool._resident[args.tier]
        for clients in args.clients:
            def client(c: int) -> list:
                return [pool.generate(args.tier, PROMPTS[(c + r) % len(PROMPTS)], temperature=0.0,
                                      max_tokens=args.max_tokens) for r in range(args.requests_per_client)]
            steps0, seqs0 = backend.steps, backend.step_sequences
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as ex:
                gens = [g for gs in ex.map(client, range(clients)) for g in gs]
            wall = time.perf_counter() - t0
            tokens = sum(g.completion_tokens for g in gens)
            steps = backend.steps - steps0
            rows.append({"clients": clients, "requests": len(gens), "completion_tokens": tokens,
                         "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
                         "mean_sequences_per_step": round((backend.step_sequences - seqs0) / max(steps, 1), 2),
                         "p50_latency_ms": round(sorted(g.latency_ms for g in gens)[len(gens) // 2], 1)})
            print(rows[-1], flush=True)
    finally:
        pool.close()
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_first"] = round(r["tokens_per_s"] / base, 2)
    report = {"meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                       "command": "python benches/transformers_batching.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
              "settings": vars(args), "device": backend.device, "rows": rows}
    md = [f"# transformers backend: batched decode ({args.tier}, {backend.device})", "",
          f"{report['meta']['date']}, {report['meta']['machine']['cores']} cores, load average after "
          f"{report['meta']['loadavg_after']}; `{report['meta']['command']}`", "",
          "| clients | requests | completion tokens | wall s | tokens/s | x vs 1 client | mean sequences/step | P50 ms |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['clients']} | {r['requests']} | {r['completion_tokens']} | {r['wall_s']} | {r['tokens_per_s']} | "
           f"{r['speedup_vs_first']} | {r['mean_sequences_per_step']} | {r['p50_latency_ms']} |" for r in rows]
    md += ["", "One run on a machine shared with other jobs: indicative only."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transformers_batching.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "transformers_batching.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return report


if __name__ == "__main__":
    main()
