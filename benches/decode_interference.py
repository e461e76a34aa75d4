"""Do torch's and faiss's OpenMP threads slow llama.cpp's decoding afterwards?

Each case runs in a fresh process: load the edge profile's llama.cpp pool; then one small torch
matmul with `torch.set_num_threads(THREADS)`, or the memory service (faiss HNSW + SQLite, torch
at 1 thread) writing 3000 nodes through its writeback worker and answering 5 searches with
``memory.index_threads = THREADS`` (0 = OpenMP's default, one per core), or nothing; then generate
16 greedy tokens for 4 questions x 4 rounds (the first round is not counted) and time every
``llama_decode`` call.  The cases run `--repeats` times in turn (a 2-vCPU VM is noisy).  Reported:
the mean decode step after the prompt (ms per token), P50 over every counted generation of a case
with its 95 % CI (sign-test order statistics, ``experiments.metrics.median_ci``; the generations of
one process are not independent, so read it as within-case spread).
The serving process limits both libraries with ``system.torch_threads`` and
``memory.index_threads`` (default 1) because of what this measures.  Writes
``benches/results/decode_interference.{md,json}``.

    flock /tmp/ruvllm-heavy.lock .venv/bin/python benches/decode_interference.py   # ~2 min
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ruvllm_lab.experiments.metrics import median_ci  # noqa: E402

CASES = [("nothing", 0), ("torch", 2), ("torch", 1), ("memory", 0), ("memory", 1)]
QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "Name a primary colour.",
             "Who wrote Hamlet?"]
ROUNDS, MAX_TOKENS = 4, 16


def measure(library: str, threads: int, config: str) -> dict:
    """One case, in this process (run it in a fresh one: the effect outlives the call)."""
    import llama_cpp

    from ruvllm_lab import Config
    from ruvllm_lab.inference import InferencePool

    cfg = Config.load(config)
    pool = InferencePool(cfg.inference, cfg.system)
    if library == "torch":
        import torch
        torch.set_num_threads(threads)
        x = torch.randn(256, 256)
        float((x @ x).sum())
    elif library == "memory":  # the real memory service: adds on its writeback worker, searches here
        import dataclasses
        import tempfile

        import torch

        from ruvllm_lab.memory import MemoryService
        from ruvllm_lab.memory.vectors import clustered_unit_vectors

        torch.set_num_threads(1)
        tmp = tempfile.mkdtemp(prefix="ruvllm-interference-")
        mem_cfg = dataclasses.replace(cfg.memory, db_path=f"{tmp}/memory.db", index_threads=threads)
        memory = MemoryService(mem_cfg, cfg.embedding.dimension)
        vectors = clustered_unit_vectors(3000, cfg.embedding.dimension, clusters=30, seed=0)
        for i, v in enumerate(vectors):
            memory.enqueue(f"note {i}", vector=v)
        memory.flush()
        for v in vectors[:5]:
            memory.search(v, k=8)
    steps: list[float] = []
    real_decode = llama_cpp.llama_decode

    def timed_decode(ctx, batch):
        t0 = time.perf_counter()
        rc = real_decode(ctx, batch)
        steps.append(time.perf_counter() - t0)
        return rc

    llama_cpp.llama_decode = timed_decode  # the backend looks it up on the module at each step
    per_generation = []
    try:
        for round_ in range(ROUNDS):
            for q in QUESTIONS:
                steps.clear()
                messages = [{"role": "system", "content": cfg.prompt.system_prompt}, {"role": "user", "content": q}]
                pool.generate(cfg.inference.models[0], messages, max_tokens=MAX_TOKENS, temperature=0.0)
                if round_ > 0 and len(steps) > 1:
                    per_generation.append(statistics.mean(steps[1:]) * 1e3)  # steps[0] is the prompt
    finally:
        llama_cpp.llama_decode = real_decode
        pool.close()
    return {"library": library, "threads": threads, "decode_step_p50_ms": statistics.median(per_generation),
            "steps_ms": per_generation}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "edge.toml"))
    ap.add_argument("--out", type=Path, default=ROOT / "benches" / "results")
    ap.add_argument("--repeats", type=int, default=3, help="passes over all cases")
    ap.add_argument("--case", nargs=2, metavar=("LIBRARY", "THREADS"), help=argparse.SUPPRESS)  # the child
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(measure(args.case[0], int(args.case[1]), args.config)))
        return 0
    runs: dict[tuple[str, int], list[float]] = {case: [] for case in CASES}
    for _ in range(args.repeats):
        for library, threads in CASES:
            out = subprocess.run([sys.executable, __file__, "--config", args.config, "--case", library, str(threads)],
                                 check=True, capture_output=True, text=True).stdout
            run = json.loads(out.strip().splitlines()[-1])
            runs[(library, threads)] += run["steps_ms"]
            print({k: v for k, v in run.items() if k != "steps_ms"}, flush=True)
    rows = [{"library": library, "threads": threads, "generations": len(v), "decode_step_p50_ms": statistics.median(v),
             "decode_step_p50_ci_ms": list(median_ci(v)[1:]), "steps_ms": v}
            for (library, threads), v in runs.items()]
    base = rows[0]["decode_step_p50_ms"]
    lines = [f"# llama.cpp decode after torch / faiss OpenMP work ({datetime.now(timezone.utc).isoformat(timespec='seconds')})",
             "", f"`python benches/decode_interference.py` ({platform.machine()}, {os.cpu_count()} cores, load average "
             f"{os.getloadavg()[0]:.2f} at the end; profile {os.path.relpath(args.config, ROOT)}, greedy, "
             f"{MAX_TOKENS} tokens, {len(QUESTIONS)} questions x {ROUNDS - 1} counted rounds per case and pass, "
             f"{args.repeats} passes, one process per case and pass)", "",
             "| work before decoding | OpenMP threads | generations | decode step P50 ms [95 % CI] | vs nothing |",
             "|---|---|---|---|---|"]
    for r in rows:
        threads = "-" if r["library"] == "nothing" else r["threads"] or "OpenMP default"
        lo, hi = r["decode_step_p50_ci_ms"]
        lines.append(f"| {r['library']} | {threads} | {r['generations']} | {r['decode_step_p50_ms']:.2f} "
                     f"[{lo:.2f}, {hi:.2f}] | "
                     f"{r['decode_step_p50_ms'] / base:.2f}x |")
    md = "\n".join(lines) + "\n"
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_interference.json").write_text(json.dumps({"rows": rows}, indent=2))
    (args.out / "decode_interference.md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
