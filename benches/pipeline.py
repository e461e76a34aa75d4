"""End-to-end pipeline benchmark: latency P50/P99 and QPS under concurrency, orchestration overhead
with a full memory store, and peak resident memory, on the edge profile.

    flock /tmp/ruvllm-heavy.lock .venv/bin/python benches/pipeline.py     # defaults (a few minutes)
    .venv/bin/python benches/pipeline.py --quick                          # tiny smoke run
    ruvllm bench [--config configs/edge.toml] [--set SECTION.KEY=VALUE] [--quick ...]

* Memory: before the model is loaded, a child process fills a fresh store (under a temp dir) with
  `--memory-nodes` synthetic nodes through MemoryService's writeback queue: clustered random unit
  vectors, so the 'similar' edges the service draws give graph expansion real work.  Their cosine
  to a real question stays under attention.min_relevance, so they are searched, expanded and
  ranked but not shown to the model.  The fill runs in a child so the peak RSS below is the
  serving process alone.
* Load: `--warmup` sequential queries (model load, first eviction when the store is at
  memory.max_nodes), then for each `--concurrency` level a ThreadPoolExecutor of that many
  clients sends `--n-requests` distinct questions from ruvllm_lab.workloads.generate through
  `RuvLLM.query_with` with `max_tokens=--max-tokens`.  Latency is measured around the call;
  QPS is answered requests / wall time of the level.  system.max_concurrent_requests is raised
  to the largest level (requests it rejects with Overloaded are counted, not retried).
* Overhead: Response.latency_ms["total"] minus its "generate" stage, i.e. embed, retrieve,
  route, attention, judge and writeback (and the gaps between them).
* Peak RSS: resource.getrusage(RUSAGE_SELF).ru_maxrss of this process after the run.

Targets are the seed's edge targets; every measurement is reported beside its target with
pass/miss.  Prints a markdown table and writes benches/results/pipeline.{json,md}
(pipeline-quick.{json,md} with --quick).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ruvllm_lab import Config, Constraints, Request, RuvLLM, workloads  # noqa: E402
from ruvllm_lab.errors import Overloaded  # noqa: E402

TARGETS = {"p50_ms": 500.0, "p99_ms": 2000.0, "qps": 20.0, "peak_rss_mb": 4096.0}  # seed, edge (4 GB)
STAGES = ["embed", "retrieve", "route", "attention", "generate", "judge", "writeback", "total"]
DEFAULTS = {"memory_nodes": 100_000, "n_requests": 40, "concurrency": "1,2,4", "max_tokens": 16, "warmup": 3}
QUICK = {"memory_nodes": 1000, "n_requests": 4, "concurrency": "1,2", "max_tokens": 4, "warmup": 1}


def fill_store(cfg: Config, n: int) -> None:
    """Write `n` synthetic nodes to cfg.memory.db_path through the writeback queue (run in a child)."""
    from ruvllm_lab.memory import MemoryService
    from ruvllm_lab.memory.vectors import clustered_unit_vectors

    vectors = clustered_unit_vectors(n, cfg.embedding.dimension, clusters=max(10, n // 100), seed=0)
    # Bigger writeback batches than serving uses mean fewer faiss adds; past ~256 the intra-batch edge
    # candidates (O(batch^2)) make it slower again.
    mem_cfg = dataclasses.replace(cfg.memory, writeback_batch_size=256)
    with MemoryService(mem_cfg, cfg.embedding.dimension) as mem:
        for i, v in enumerate(vectors):
            mem.enqueue(f"Archived note {i}: synthetic filler memory.", kind="interaction", vector=v)
        mem.flush()


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q))


def run_level(llm, queries: list[str], concurrency: int, max_tokens: int) -> dict:
    def one(q: str) -> dict:
        t0 = time.perf_counter()
        try:
            r = llm.query_with(Request(q, constraints=Constraints(max_tokens=max_tokens)))
        except Overloaded:
            return {"query": q, "rejected": True}
        return {"query": q, "rejected": False, "e2e_ms": (time.perf_counter() - t0) * 1e3,
                "latency_ms": r.latency_ms, "tier": r.routing_info.get("tier"),
                "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as ex:
        rows = list(ex.map(one, queries))
    wall = time.perf_counter() - t0
    ok = [r for r in rows if not r["rejected"]]
    for r in ok:
        r["overhead_ms"] = r["latency_ms"]["total"] - r["latency_ms"]["generate"]
    e2e, overhead = [r["e2e_ms"] for r in ok], [r["overhead_ms"] for r in ok]
    return {
        "concurrency": concurrency, "requests": len(rows), "ok": len(ok), "rejected": len(rows) - len(ok),
        "wall_s": wall, "qps": len(ok) / wall,
        "p50_ms": pct(e2e, 50), "p99_ms": pct(e2e, 99), "mean_ms": float(np.mean(e2e)),
        "overhead_p50_ms": pct(overhead, 50), "overhead_p99_ms": pct(overhead, 99),
        "overhead_share_p50": pct([o / r["latency_ms"]["total"] for o, r in zip(overhead, ok)], 50),
        "stage_p50_ms": {s: pct([r["latency_ms"].get(s, 0.0) for r in ok], 50) for s in STAGES},
        "mean_completion_tokens": float(np.mean([r["completion_tokens"] for r in ok])),
        "mean_prompt_tokens": float(np.mean([r["prompt_tokens"] for r in ok])),
        "tiers": sorted({r["tier"] for r in ok}),
        "requests_detail": rows,
    }


def machine() -> dict:
    import llama_cpp
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__, "load_1m_at_start": os.getloadavg()[0]}


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def verdict(value: float, target: float, below: bool = True) -> str:
    return "pass" if (value < target if below else value >= target) else "miss"


def markdown(report: dict) -> str:
    m, s, mem = report["meta"], report["settings"], report["memory"]
    lines = [f"# Pipeline benchmark ({m['date']})", "",
             f"Machine: {m['machine']['cpu']}, {m['machine']['cores']} cores, {m['machine']['platform']}, "
             f"llama-cpp-python {m['machine']['llama_cpp_python']}, 1-min load average at start "
             f"{m['machine']['load_1m_at_start']:.2f}; commit `{m['git_commit']}`; "
             f"command: `{m['command']}`.", "",
             f"Profile `{s['config']}` (tier {', '.join(s['tiers'])}), max_tokens={s['max_tokens']}, "
             f"{s['n_requests']} distinct workload questions per level after {s['warmup']} warm-up queries; "
             f"memory store pre-filled with {s['memory_nodes']} synthetic nodes (memory.max_nodes = "
             f"{s['memory_max_nodes']}); system.max_concurrent_requests {s['profile_max_concurrent']} -> "
             f"{s['max_concurrent_requests']}.  P99 of {s['n_requests']} samples is close to the maximum.  Levels run in "
             "order on one store: answers written back become memory notes for later questions of the same "
             "families, so prompts grow from level to level (last column).", "",
             "## Latency and throughput (seed edge targets: P50 < 500 ms, P99 < 2 s, 20 QPS)", "",
             "| clients | ok / rejected | P50 ms | P50 < 500 ms | P99 ms | P99 < 2 s | QPS | QPS >= 20 "
             "| mean tokens (prompt / completion) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["levels"]:
        lines.append(
            f"| {r['concurrency']} | {r['ok']} / {r['rejected']} | {r['p50_ms']:.0f} | "
            f"{verdict(r['p50_ms'], TARGETS['p50_ms'])} | {r['p99_ms']:.0f} | {verdict(r['p99_ms'], TARGETS['p99_ms'])} | "
            f"{r['qps']:.2f} | {verdict(r['qps'], TARGETS['qps'], below=False)} | "
            f"{r['mean_prompt_tokens']:.0f} / {r['mean_completion_tokens']:.1f} |")
    lines += ["", f"## Orchestration overhead (total - generate), store of ~{s['memory_nodes']} nodes", "",
              "| clients | overhead P50 ms | overhead P99 ms | share of total (P50) | "
              + " | ".join(f"{st} P50 ms" for st in STAGES) + " |",
              "|---|---|---|---|" + "---|" * len(STAGES)]
    for r in report["levels"]:
        lines.append(f"| {r['concurrency']} | {r['overhead_p50_ms']:.1f} | {r['overhead_p99_ms']:.1f} | "
                     f"{100 * r['overhead_share_p50']:.1f} % | "
                     + " | ".join(f"{r['stage_p50_ms'][st]:.1f}" for st in STAGES) + " |")
    lines += ["", "## Memory and start-up", "", "| measure | value | target | result |", "|---|---|---|---|",
              f"| peak RSS of the serving process (ru_maxrss) | {mem['peak_rss_mb']:.0f} MiB | < 4 GB (4096 MiB) | "
              f"{verdict(mem['peak_rss_mb'], TARGETS['peak_rss_mb'])} |",
              f"| profile budget system.max_memory_mb | {s['profile_max_memory_mb']} MiB | (config) | "
              f"{verdict(mem['peak_rss_mb'], s['profile_max_memory_mb'])} |",
              f"| store fill ({s['memory_nodes']} nodes, child process) | {mem['fill_s']:.1f} s | | |",
              f"| RuvLLM open (store + index load) | {mem['open_s']:.1f} s | | |",
              f"| first (cold) query | {mem['first_query_ms']:.0f} ms | | |",
              f"| store after the run | {mem['nodes_after']} nodes, {mem['edges_after']} edges | | |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="benches/pipeline.py", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "edge.toml"))
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    ap.add_argument("--memory-nodes", type=int, help=f"synthetic nodes in the store (default {DEFAULTS['memory_nodes']})")
    ap.add_argument("--n-requests", type=int, help=f"requests per concurrency level (default {DEFAULTS['n_requests']})")
    ap.add_argument("--concurrency", help=f"comma-separated client counts (default {DEFAULTS['concurrency']})")
    ap.add_argument("--max-tokens", type=int, help=f"per request (default {DEFAULTS['max_tokens']})")
    ap.add_argument("--warmup", type=int, help=f"sequential queries before measuring (default {DEFAULTS['warmup']})")
    ap.add_argument("--quick", action="store_true", help="tiny run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    ap.add_argument("--out", type=Path, default=ROOT / "benches" / "results")
    ap.add_argument("--fill-only", action="store_true", help=argparse.SUPPRESS)  # the child that fills the store
    args = ap.parse_args(argv)
    for k, v in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first query loads the model)")

    if args.fill_only:
        fill_store(Config.load(args.config, overrides=args.set), args.memory_nodes)
        return 0

    profile = Config.load(args.config, overrides=args.set)
    started = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="ruvllm-bench-") as tmp:
        sets = [f"memory.db_path={tmp}/memory.db", f"system.data_dir={tmp}/state",
                f"system.max_concurrent_requests={max(levels)}"] + args.set  # the user's --set wins
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--config", args.config,
                        "--memory-nodes", str(args.memory_nodes), "--fill-only"]
                       + [f"--set={x}" for x in sets], check=True)
        fill_s = time.perf_counter() - t0
        print(f"filled the store with {args.memory_nodes} nodes in {fill_s:.1f} s", flush=True)

        cfg = Config.load(args.config, overrides=sets)
        questions = [w.query for w in workloads.generate(n=args.warmup + args.n_requests * len(levels), seed=0)]
        t0 = time.perf_counter()
        with RuvLLM(cfg) as llm:
            open_s = time.perf_counter() - t0
            warmup_ms = []
            for q in questions[: args.warmup]:
                t0 = time.perf_counter()
                llm.query_with(Request(q, constraints=Constraints(max_tokens=args.max_tokens)))
                warmup_ms.append((time.perf_counter() - t0) * 1e3)
            results = []
            for i, c in enumerate(levels):
                start = args.warmup + i * args.n_requests
                results.append(run_level(llm, questions[start:start + args.n_requests], c, args.max_tokens))
                r = results[-1]
                print(f"  {c} clients: P50 {r['p50_ms']:.0f} ms, P99 {r['p99_ms']:.0f} ms, {r['qps']:.2f} QPS, "
                      f"overhead P50 {r['overhead_p50_ms']:.1f} ms, rejected {r['rejected']}", flush=True)
            nodes_after, edges_after = llm.memory.count(), llm.memory.stats()["edges"]
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    report = {
        "meta": {**started, "git_commit": git_commit(), "command": " ".join(["python benches/pipeline.py", *argv])},
        "targets": TARGETS,
        "settings": {"config": os.path.relpath(args.config, ROOT), "overrides": sets, "tiers": cfg.inference.models,
                     "memory_nodes": args.memory_nodes, "memory_max_nodes": cfg.memory.max_nodes,
                     "n_requests": args.n_requests, "concurrency": levels, "max_tokens": args.max_tokens,
                     "warmup": args.warmup, "max_concurrent_requests": cfg.system.max_concurrent_requests,
                     "profile_max_concurrent": profile.system.max_concurrent_requests,
                     "profile_max_memory_mb": profile.system.max_memory_mb},
        "memory": {"peak_rss_mb": peak_rss_mb, "fill_s": fill_s, "open_s": open_s, "first_query_ms": warmup_ms[0],
                   "nodes_after": nodes_after, "edges_after": edges_after},
        "levels": results,
    }
    md = markdown(report)
    print(md)
    name = "pipeline-quick" if args.quick else "pipeline"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{name}.md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
