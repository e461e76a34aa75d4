"""End-to-end pipeline benchmark: latency P50/P99 and QPS under concurrency, orchestration overhead
with a full memory store, and peak resident memory, on the edge profile.

    flock /tmp/ruvllm-heavy.lock .venv/bin/python benches/pipeline.py     # defaults (a few minutes)
    .venv/bin/python benches/pipeline.py --quick                          # tiny smoke run
    ruvllm bench [--config configs/edge.toml] [--set SECTION.KEY=VALUE] [--quick ...]

* Memory: before the model is loaded, a child process fills a fresh store (under a temp dir) with
  `--memory-nodes` synthetic nodes through MemoryService's writeback queue: clustered random unit
  vectors, so the 'similar' edges the service draws give graph expansion real work.  Their cosine
  to a real question stays under retrieval.relevance_threshold, so they are searched, expanded and
  ranked but not shown to the model.  The fill runs in a child so the peak RSS below is the
  serving process alone.
* Load: each `--concurrency` level starts from its own copy of the filled store (one model pool
  and embedder shared by all levels), so no level inherits the answers an earlier one wrote back
  (they would become notes and lengthen later levels' prompts).  `--warmup` sequential queries
  (model load on the first level, first eviction when the store is at memory.max_nodes), then a
  ThreadPoolExecutor of that many clients sends max(`--n-requests`, `--requests-per-client` x
  clients) questions (6 per client by default, so the steady state below holds 2C+ of them) from
  ruvllm_lab.workloads.generate(distinct=True), none asked twice in the run (a question asked
  before could find its whole prompt in a slot's KV cache), through `RuvLLM.query_with` with
  `max_tokens=--max-tokens`.  Latency is measured around the call.  system.max_concurrent_requests
  is raised to the largest level (requests it rejects with Overloaded are counted, not retried).
* Throughput: closed-loop clients, so a level starts with every client sending at once and ends
  with clients running out of work.  QPS is measured in the steady state between the two: with
  N requests, C clients and completion times t_1 <= ... <= t_N, every client is busy from t_C
  (each has finished its first request) to t_{N-C} (the last request is handed out), and
  QPS = (N - 2C) / (t_{N-C} - t_C).  The whole-level rate (answered / wall time, ramps included)
  is reported beside it.
* Rounds: the levels run `--rounds` times, interleaved, every other round in reverse order (1, 2,
  ..., 16, 16, ..., 2, 1, 1, 2, ...), so a slow spell or a drift of this shared VM hits every level
  alike.  QPS per level is the mean over rounds with a
  Student-t 95 % CI; "QPS falls from C to C'" is judged on the per-round paired differences (a
  fall counts when its CI lies below zero).  Latencies pool the rounds' requests.
* Overhead: Response.latency_ms["total"] minus its "generate" stage, i.e. embed, retrieve,
  route, attention, judge and writeback (and the gaps between them).
* Peak RSS: resource.getrusage(RUSAGE_SELF).ru_maxrss of this process after the run.
* Raw anchor (after every round, in a child process): plain llama.cpp decoding B = 1, 2, 4, 8, 16
  sequences together (tokens/s) and one prefill; from them the QPS raw llama.cpp allows for each
  level's mean prompt/completion token counts in that round, and pipeline QPS as a share of it,
  paired within the round.

Targets are the seed's edge targets and issue 15's; every measurement is reported beside its target
with pass / miss (and, for a ratio with a CI across it, inconclusive).  Prints a markdown table and writes benches/results/pipeline.{json,md}
(pipeline-quick.{json,md} with --quick).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import os
import platform
import resource
import shutil
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
from ruvllm_lab.embedding import EmbeddingService  # noqa: E402
from ruvllm_lab.inference import InferencePool  # noqa: E402
from ruvllm_lab.telemetry import release_free_heap  # noqa: E402
from ruvllm_lab.errors import Overloaded  # noqa: E402
from ruvllm_lab.experiments.metrics import median_ci  # noqa: E402
from ruvllm_lab.experiments.results import t_interval  # noqa: E402

TARGETS = {"p50_ms": 500.0, "p99_ms": 2000.0, "qps": 20.0, "peak_rss_mb": 4096.0}  # seed, edge (4 GB)
STAGES = ["embed", "retrieve", "route", "attention", "generate", "judge", "writeback", "total"]
DEFAULTS = {"memory_nodes": 100_000, "n_requests": 48, "requests_per_client": 6, "concurrency": "1,2,4,8,16",
            "max_tokens": 16, "warmup": 3, "rounds": 3}
QUICK = {"memory_nodes": 1000, "n_requests": 4, "requests_per_client": 1, "concurrency": "1,2", "max_tokens": 4,
         "warmup": 1, "rounds": 1}
RAW_BATCHES = (1, 2, 4, 8, 16)
RAW_DECODE_STEPS = 48  # decode steps timed per batch size (after 4 untimed)
RAW_PREFILL_TOKENS = 256  # prompt tokens per timed prefill


def raw_llama_rates(tier: str, n_threads: int, batches=RAW_BATCHES, steps: int = RAW_DECODE_STEPS) -> dict:
    """The physical anchor: plain llama.cpp (no pool, no Python sampling), greedy argmax in C order.

    decode_tps[B]: tokens/s of B sequences decoded together, one token each per llama_decode.
    prefill_tps: tokens/s of one RAW_PREFILL_TOKENS-token prompt in one llama_decode.
    """
    import llama_cpp
    from llama_cpp._internals import LlamaContext, LlamaModel

    from ruvllm_lab import models
    from ruvllm_lab.inference.llama_cpp_backend import resolve_threads

    threads = resolve_threads(n_threads)
    model = LlamaModel(path_model=str(models.model_path(tier)), params=llama_cpp.llama_model_default_params(),
                       verbose=False)
    rates: dict = {"decode_tps": {}, "threads": threads}
    prompt = model.tokenize(b"The history of the city begins with a small harbour on the river, where", True, False)
    for b in batches:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = 1024 * b, 512, 512
        params.n_seq_max, params.kv_unified = b, False
        params.n_threads = params.n_threads_batch = threads
        ctx = LlamaContext(model=model, params=params, verbose=False)
        batch = llama_cpp.llama_batch_init(512, 0, 1)

        def decode(tokens_pos_seq_logits):
            for i, (tok, pos, seq, out) in enumerate(tokens_pos_seq_logits):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, out
                batch.seq_id[i][0] = seq
            batch.n_tokens = len(tokens_pos_seq_logits)
            assert llama_cpp.llama_decode(ctx.ctx, batch) == 0

        for seq in range(b):  # the same short prompt in every sequence
            decode([(t, i, seq, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        pos, token = len(prompt), 28  # any ordinary token id: decode cost does not depend on which
        for step in range(4 + steps):
            if step == 4:
                t0 = time.perf_counter()
            decode([(token, pos, seq, True) for seq in range(b)])
            pos += 1
        rates["decode_tps"][b] = b * steps / (time.perf_counter() - t0)
        if b == 1:  # prefill rate: a fresh sequence, one long chunk
            llama_cpp.llama_memory_seq_rm(ctx.memory, 0, -1, -1)
            long_prompt = (prompt * (RAW_PREFILL_TOKENS // len(prompt) + 1))[:RAW_PREFILL_TOKENS]
            t0 = time.perf_counter()
            decode([(t, i, 0, i == len(long_prompt) - 1) for i, t in enumerate(long_prompt)])
            rates["prefill_tps"] = len(long_prompt) / (time.perf_counter() - t0)
        llama_cpp.llama_batch_free(batch)
        ctx.close()
    model.close()
    return rates


def raw_allowed_qps(clients: int, prompt_tokens: float, completion_tokens: float, rates: dict) -> float:
    """Requests/s raw llama.cpp could serve for `clients` at once with these token counts: every prompt
    token given prefilled at prefill_tps, then completion_tokens steps of a batch of `clients` at
    decode_tps[clients] (the nearest measured batch size at or below it).  Prefill is compute-bound
    and does not get cheaper per token in a batch, so the ratio between levels is bounded by how much
    of a request is decode."""
    b = max(k for k in rates["decode_tps"] if k <= clients)
    seconds = clients * prompt_tokens / rates["prefill_tps"] + clients * completion_tokens / rates["decode_tps"][b]
    return clients / seconds


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
        done = time.perf_counter()
        return {"query": q, "rejected": False, "e2e_ms": (done - t0) * 1e3, "done_s": done - start,
                "latency_ms": r.latency_ms, "tier": r.routing_info.get("tier"),
                "prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens,
                "prompt_tokens_evaluated": r.usage.prompt_tokens_evaluated}

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as ex:
        rows = list(ex.map(one, queries))
    wall = time.perf_counter() - start
    ok = [r for r in rows if not r["rejected"]]
    return {"concurrency": concurrency, "requests": len(rows), "ok": len(ok), "rejected": len(rows) - len(ok),
            "wall_s": wall, "qps_wall": len(ok) / wall, "qps": steady_qps([r["done_s"] for r in ok], concurrency),
            "requests_detail": rows}


def steady_qps(done_s: list[float], clients: int) -> float:
    """Completions per second while all `clients` were busy: (N - 2C) / (t_{N-C} - t_C) over the
    sorted completion times (module docstring); the whole-level rate when N <= 2C leaves no window."""
    t, n = sorted(done_s), len(done_s)
    if n > 2 * clients and t[n - clients - 1] > t[clients - 1]:
        return (n - 2 * clients) / (t[n - clients - 1] - t[clients - 1])
    return n / t[-1] if n else 0.0


def anchor(level_round: dict, rates: dict) -> None:
    """Put one round of a level beside the raw llama.cpp rates measured in the same round."""
    ok = [r for r in level_round["requests_detail"] if not r["rejected"]]
    c = level_round["concurrency"]
    prompt, completion = (float(np.mean([r[k] for r in ok])) for k in ("prompt_tokens", "completion_tokens"))
    evaluated = float(np.mean([r["prompt_tokens_evaluated"] for r in ok]))
    level_round["raw_allowed_qps"] = raw_allowed_qps(c, prompt, completion, rates)
    # The same bound when only the prompt tokens the pipeline really evaluated are prefilled (the rest
    # came from a slot's cached system-prompt prefix): the physical ceiling for its QPS.
    level_round["raw_allowed_qps_reused"] = raw_allowed_qps(c, evaluated, completion, rates)


def summarise_level(rounds: list[dict]) -> dict:
    """One concurrency level over its rounds: QPS mean and t-interval over rounds, latencies pooled."""
    ok = [r for rd in rounds for r in rd["requests_detail"] if not r["rejected"]]
    for r in ok:
        r["overhead_ms"] = r["latency_ms"]["total"] - r["latency_ms"]["generate"]
    e2e, overhead = [r["e2e_ms"] for r in ok], [r["overhead_ms"] for r in ok]
    _, qps, qps_lo, qps_hi = t_interval([rd["qps"] for rd in rounds])
    _, over_raw, over_raw_lo, over_raw_hi = t_interval([rd["qps"] / rd["raw_allowed_qps"] for rd in rounds])
    _, over_ceiling, over_ceiling_lo, over_ceiling_hi = t_interval(
        [rd["qps"] / rd["raw_allowed_qps_reused"] for rd in rounds])
    return {
        "concurrency": rounds[0]["concurrency"], "rounds": len(rounds),
        "requests": sum(rd["requests"] for rd in rounds), "ok": len(ok),
        "rejected": sum(rd["rejected"] for rd in rounds),
        "qps": qps, "qps_ci": [qps_lo, qps_hi], "qps_rounds": [rd["qps"] for rd in rounds],
        "qps_wall": float(np.mean([rd["qps_wall"] for rd in rounds])),
        "raw_allowed_qps": float(np.mean([rd["raw_allowed_qps"] for rd in rounds])),
        "raw_allowed_qps_reused": float(np.mean([rd["raw_allowed_qps_reused"] for rd in rounds])),
        "raw_allowed_qps_reused_rounds": [rd["raw_allowed_qps_reused"] for rd in rounds],
        "qps_over_raw": over_raw, "qps_over_raw_ci": [over_raw_lo, over_raw_hi],
        "qps_over_ceiling": over_ceiling, "qps_over_ceiling_ci": [over_ceiling_lo, over_ceiling_hi],
        "p50_ms": pct(e2e, 50), "p99_ms": pct(e2e, 99), "mean_ms": float(np.mean(e2e)),
        "p50_ci_ms": list(median_ci(e2e)[1:]),
        "overhead_p50_ms": pct(overhead, 50), "overhead_p99_ms": pct(overhead, 99),
        "overhead_p50_ci_ms": list(median_ci(overhead)[1:]),
        "overhead_share_p50": pct([o / r["latency_ms"]["total"] for o, r in zip(overhead, ok)], 50),
        "stage_p50_ms": {s: pct([r["latency_ms"].get(s, 0.0) for r in ok], 50) for s in STAGES},
        "mean_completion_tokens": float(np.mean([r["completion_tokens"] for r in ok])),
        "mean_prompt_tokens": float(np.mean([r["prompt_tokens"] for r in ok])),
        "mean_prompt_tokens_evaluated": float(np.mean([r["prompt_tokens_evaluated"] for r in ok])),
        "tiers": sorted({r["tier"] for r in ok}),
        "requests_detail": ok,
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


def interval_verdict(value: float, lo: float, hi: float, target: float) -> str:
    """'pass' / 'miss' when the 95 % CI lies wholly on one side of `target` (or, with one round and no
    CI, by the point value), 'inconclusive' when it straddles it."""
    if np.isnan(lo):
        return verdict(value, target, below=False)
    return "pass" if lo >= target else "miss" if hi < target else "inconclusive"


def _each(values) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


def _pct(value: float, interval) -> str:
    lo, hi = interval
    return f"{100 * value:.0f} %" + ("" if np.isnan(lo) else f" [{100 * lo:.0f}, {100 * hi:.0f}]")


def _ci(interval) -> str:
    lo, hi = interval
    return "[n/a: 1 round]" if np.isnan(lo) else f"[{lo:.2f}, {hi:.2f}]"


def markdown(report: dict) -> str:
    m, s, mem = report["meta"], report["settings"], report["memory"]
    lines = [f"# Pipeline benchmark ({m['date']})", "",
             f"Machine: {m['machine']['cpu']}, {m['machine']['cores']} cores, {m['machine']['platform']}, "
             f"llama-cpp-python {m['machine']['llama_cpp_python']}, 1-min load average at start "
             f"{m['machine']['load_1m_at_start']:.2f}; commit `{m['git_commit']}`; "
             f"command: `{m['command']}`.", "",
             f"Profile `{s['config']}` (tier {', '.join(s['tiers'])}), max_tokens={s['max_tokens']}; each level "
             f"runs {s['rounds']} times, interleaved with the others (every other round in reverse order), after "
             f"{s['warmup']} warm-up queries; requests "
             "per round: " + ", ".join(f"{n} at {c} client{'s' * (int(c) > 1)}" for c, n in s["requests_per_level"].items())
             + "; every question is distinct in the run; "
             f"memory store pre-filled with {s['memory_nodes']} synthetic nodes (memory.max_nodes = "
             f"{s['memory_max_nodes']}); system.max_concurrent_requests {s['profile_max_concurrent']} -> "
             f"{s['max_concurrent_requests']}.  Each level starts from its own copy of the filled store (one model "
             "pool for all levels), so no level sees the answers an earlier level wrote back.", "",
             "QPS is the steady-state rate while every client is busy, (N - 2C) / (t_{N-C} - t_C) over a round's "
             "completion times, as a mean over rounds with a Student-t 95 % CI (n = rounds: a wide interval "
             "means this VM's speed drifted between rounds); 'over the level' is answered / wall time with the "
             "start and end ramps in.  Latencies pool the rounds' requests: P50 with a sign-test 95 % CI, P99 "
             "(near the maximum when a level has few requests).", "",
             "## Latency and throughput (seed edge targets: P50 < 500 ms, P99 < 2 s, 20 QPS)", "",
             "| clients | ok / rejected | P50 ms [95 % CI] | P50 < 500 ms | P99 ms | P99 < 2 s "
             "| QPS [95 % CI] | QPS per round | QPS over the level | QPS >= 20 | mean tokens (prompt / completion) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["levels"]:
        lines.append(
            f"| {r['concurrency']} | {r['ok']} / {r['rejected']} | {r['p50_ms']:.0f} [{r['p50_ci_ms'][0]:.0f}, "
            f"{r['p50_ci_ms'][1]:.0f}] | "
            f"{verdict(r['p50_ms'], TARGETS['p50_ms'])} | {r['p99_ms']:.0f} | {verdict(r['p99_ms'], TARGETS['p99_ms'])} | "
            f"{r['qps']:.2f} {_ci(r['qps_ci'])} | {', '.join(f'{q:.2f}' for q in r['qps_rounds'])} | "
            f"{r['qps_wall']:.2f} | {verdict(r['qps'], TARGETS['qps'], below=False)} | "
            f"{r['mean_prompt_tokens']:.0f} / {r['mean_completion_tokens']:.1f} |")
    raw = report["raw_llama_cpp"]
    per_round = raw["rounds"]
    lines += ["", f"## Against raw batched llama.cpp (same run, {raw['threads']} threads)", "",
              f"Measured after every round, in a child process: decode tokens/s by batch size B (B sequences, one "
              f"token each per `llama_decode`, {RAW_DECODE_STEPS} steps) and prefill tokens/s "
              f"({RAW_PREFILL_TOKENS}-token prompt); mean over the {len(per_round)} round(s), each round's in "
              "brackets:", "",
              "| B | " + " | ".join(str(b) for b in raw["decode_tps"]) + " | prefill |",
              "|---|" + "---|" * (len(raw["decode_tps"]) + 1),
              "| tokens/s | " + " | ".join(f"{v:.0f} ({_each([x['decode_tps'][b] for x in per_round])})"
                                         for b, v in raw["decode_tps"].items())
              + f" | {raw['prefill_tps']:.0f} ({_each([x['prefill_tps'] for x in per_round])}) |",
              "| vs B=1 | " + " | ".join(f"{v / raw['decode_tps'][1]:.2f}x" for v in raw["decode_tps"].values()) + " | |",
              "", "Raw-allowed QPS for a round of a level = requests/s raw llama.cpp serves, at that round's rates, with "
              "the round's mean token counts: every prompt prefilled in full (no prefix cache), then the completion "
              "decoded in a batch of as many sequences as clients.  The ceiling prefills only the prompt tokens the "
              "pipeline really evaluated (the rest came from a slot's cached system-prompt prefix): the most the "
              "pipeline could do on this machine.  Ratios are per round (pipeline and anchor in the same round), "
              "then mean [Student-t 95 % CI] over rounds.", "",
              "| clients | pipeline QPS | raw-allowed QPS | pipeline / raw | evaluated prompt tokens | "
              "ceiling QPS | pipeline / ceiling |", "|---|---|---|---|---|---|---|"]
    for r in report["levels"]:
        lines.append(f"| {r['concurrency']} | {r['qps']:.2f} | {r['raw_allowed_qps']:.2f} | {_pct(r['qps_over_raw'], r['qps_over_raw_ci'])} "
                     f"| {r['mean_prompt_tokens_evaluated']:.1f} | {r['raw_allowed_qps_reused']:.2f} "
                     f"| {_pct(r['qps_over_ceiling'], r['qps_over_ceiling_ci'])} |")
    for tier, b in report.get("batching", {}).items():
        lines += ["", f"Scheduler of {tier} over the whole run: {b['steps']} decode steps, {b['mean_sequences']:.2f} "
                  f"sequences and {b['mean_tokens']:.1f} tokens per step on average, at most {b['peak_sequences']} "
                  "sequences in one step."]
    lines += ["", "## Issue 15 targets", "", "| target | measured | result |", "|---|---|---|"]
    for row in issue_targets(report):
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"## Orchestration overhead (total - generate), store of ~{s['memory_nodes']} nodes", "",
              "| clients | overhead P50 ms [95 % CI] | overhead P99 ms | share of total (P50) | "
              + " | ".join(f"{st} P50 ms" for st in STAGES) + " |",
              "|---|---|---|---|" + "---|" * len(STAGES)]
    for r in report["levels"]:
        lines.append(f"| {r['concurrency']} | {r['overhead_p50_ms']:.1f} [{r['overhead_p50_ci_ms'][0]:.1f}, "
                     f"{r['overhead_p50_ci_ms'][1]:.1f}] | {r['overhead_p99_ms']:.1f} | "
                     f"{100 * r['overhead_share_p50']:.1f} % | "
                     + " | ".join(f"{r['stage_p50_ms'][st]:.1f}" for st in STAGES) + " |")
    lines += ["", "## Memory and start-up", "", "| measure | value | target | result |", "|---|---|---|---|",
              f"| peak RSS of the serving process (ru_maxrss) | {mem['peak_rss_mb']:.0f} MiB | < 4 GB (4096 MiB) | "
              f"{verdict(mem['peak_rss_mb'], TARGETS['peak_rss_mb'])} |",
              f"| profile budget system.max_memory_mb | {s['profile_max_memory_mb']} MiB | (config) | "
              f"{verdict(mem['peak_rss_mb'], s['profile_max_memory_mb'])} |",
              f"| store fill ({s['memory_nodes']} nodes, child process) | {mem['fill_s']:.1f} s | | |",
              f"| RuvLLM open (store + index load; median over levels) | {mem['open_s']:.1f} s | | |",
              f"| first (cold) query | {mem['first_query_ms']:.0f} ms | | |",
              f"| store after the last level | {mem['nodes_after']} nodes, {mem['edges_after']} edges | | |"]
    return "\n".join(lines) + "\n"


def issue_targets(report: dict) -> list[tuple[str, str, str]]:
    """The 'done when' lines of issue 15 that this run measures: (target, measured, pass/miss)."""
    by = {r["concurrency"]: r for r in report["levels"]}
    rows = []
    levels = report["levels"]
    falls, significant = [], []
    for a, b in zip(levels, levels[1:]):
        _, diff, lo, hi = t_interval([qb - qa for qa, qb in zip(a["qps_rounds"], b["qps_rounds"])])
        if diff < 0:
            falls.append(f"{a['concurrency']}->{b['concurrency']}: {diff:+.2f} {_ci((lo, hi))}")
            if hi < 0:
                significant.append(falls[-1])
    measured = " -> ".join(f"{r['qps']:.2f}" for r in levels)
    if falls:
        measured += "; falls (paired over rounds, 95 % CI): " + "; ".join(falls)
    rows.append(("QPS never falls as clients are added", measured,
                 "miss" if significant else "inconclusive" if falls else "pass"))
    if 1 in by and 8 in by:
        _, ratio, lo, hi = t_interval([q8 / q1 for q1, q8 in zip(by[1]["qps_rounds"], by[8]["qps_rounds"])])
        ceiling = float(np.mean([c8 / c1 for c1, c8 in zip(by[1]["raw_allowed_qps_reused_rounds"],
                                                           by[8]["raw_allowed_qps_reused_rounds"])]))
        rows.append(("QPS at 8 clients >= 1.5x QPS at 1",
                     f"{ratio:.2f}x {_ci((lo, hi))} (raw llama.cpp allows {ceiling:.2f}x for these token counts)",
                     interval_verdict(ratio, lo, hi, 1.5)))
    if 1 in by:
        lo, hi = by[1]["p50_ci_ms"]
        rows.append(("P50 at 1 client <= 300 ms", f"{by[1]['p50_ms']:.0f} ms [{lo:.0f}, {hi:.0f}]",
                     verdict(by[1]["p50_ms"], 300.0001)))
        rows.append(("P99 at 1 client <= 1 s", f"{by[1]['p99_ms']:.0f} ms", verdict(by[1]["p99_ms"], 1000.0001)))
        lo, hi = by[1]["overhead_p50_ci_ms"]
        rows.append(("orchestration overhead P50 <= 8 ms (1 client)",
                     f"{by[1]['overhead_p50_ms']:.1f} ms [{lo:.1f}, {hi:.1f}]",
                     verdict(by[1]["overhead_p50_ms"], 8.0001)))
    if 8 in by:
        lo, hi = by[8]["qps_over_raw_ci"]
        rows.append(("pipeline QPS at 8 clients >= 70 % of raw batched decode",
                     f"{_pct(by[8]['qps_over_raw'], (lo, hi))} of the full-prefill bound; "
                     f"{_pct(by[8]['qps_over_ceiling'], by[8]['qps_over_ceiling_ci'])} of the ceiling",
                     interval_verdict(by[8]["qps_over_raw"], lo, hi, 0.7)))
    return rows


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
    ap.add_argument("--requests-per-client", type=int,
                    help=f"a level sends at least this many per client (default {DEFAULTS['requests_per_client']})")
    ap.add_argument("--rounds", type=int, help=f"times every level is measured, interleaved (default {DEFAULTS['rounds']})")
    ap.add_argument("--quick", action="store_true", help="tiny run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    ap.add_argument("--out", type=Path, default=ROOT / "benches" / "results")
    ap.add_argument("--fill-only", action="store_true", help=argparse.SUPPRESS)  # the child that fills the store
    ap.add_argument("--raw-only", action="store_true", help=argparse.SUPPRESS)  # the child that measures raw llama.cpp
    args = ap.parse_args(argv)
    for k, v in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first query loads the model)")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")

    if args.fill_only:
        fill_store(Config.load(args.config, overrides=args.set), args.memory_nodes)
        return 0
    if args.raw_only:
        inference = Config.load(args.config, overrides=args.set).inference
        print(json.dumps(raw_llama_rates(inference.models[0], inference.n_threads)))
        return 0

    profile = Config.load(args.config, overrides=args.set)
    started = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="ruvllm-bench-") as tmp:
        filled = Path(tmp) / "filled"
        sets = [f"memory.db_path={filled}/memory.db", f"system.data_dir={filled}/state",
                f"system.max_concurrent_requests={max(levels)}"] + args.set  # the user's --set wins
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--config", args.config,
                        "--memory-nodes", str(args.memory_nodes), "--fill-only"]
                       + [f"--set={x}" for x in sets], check=True)
        fill_s = time.perf_counter() - t0
        print(f"filled the store with {args.memory_nodes} nodes in {fill_s:.1f} s", flush=True)

        cfg = Config.load(args.config, overrides=sets)
        sizes = {c: max(args.n_requests, args.requests_per_client * c) for c in levels}
        total = args.rounds * sum(args.warmup + n for n in sizes.values())
        questions = iter([w.query for w in workloads.generate(n=total, seed=0, distinct=True)])
        pool = InferencePool(cfg.inference, cfg.system)
        embedder = EmbeddingService(cfg.embedding, pool=pool)
        by_level: dict[int, list[dict]] = {c: [] for c in levels}
        open_s, warmup_ms, raw_rounds = [], [], []
        for round_ in range(args.rounds):
            # odd rounds run the levels backwards, so a drift of the VM's speed within a round does not
            # favour the levels that come first
            for c in (levels if round_ % 2 == 0 else levels[::-1]):
                level_dir = Path(tmp) / f"level-{c}"
                shutil.copytree(filled, level_dir)
                level_cfg = cfg.with_overrides({"memory.db_path": str(level_dir / "memory.db"),
                                                "system.data_dir": str(level_dir / "state")})
                t0 = time.perf_counter()
                with RuvLLM(level_cfg, pool=pool, embedder=embedder) as llm:
                    open_s.append(time.perf_counter() - t0)
                    for _ in range(args.warmup):
                        t0 = time.perf_counter()
                        llm.query_with(Request(next(questions), constraints=Constraints(max_tokens=args.max_tokens)))
                        warmup_ms.append((time.perf_counter() - t0) * 1e3)
                    r = run_level(llm, [next(questions) for _ in range(sizes[c])], c, args.max_tokens)
                    by_level[c].append(r)
                    print(f"  round {round_ + 1}/{args.rounds}, {c} clients: {r['qps']:.2f} QPS steady "
                          f"({r['qps_wall']:.2f} over the level), rejected {r['rejected']}", flush=True)
                    llm.memory.flush()
                    nodes_after, edges_after = llm.memory.count(), llm.memory.stats()["edges"]
                # hand this level's store and index back before the next opens its copy: the peak RSS
                # below is then one serving process's, not several stores'
                del llm
                gc.collect()
                release_free_heap()
                shutil.rmtree(level_dir)
            # the anchor in every round, in a child (its contexts stay out of this process's peak RSS), so
            # a slow spell of the VM moves a round's pipeline and raw numbers together
            rates = json.loads(subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--config", args.config, "--raw-only"]
                + [f"--set={x}" for x in sets], check=True, capture_output=True, text=True).stdout)
            rates["decode_tps"] = {int(b): v for b, v in rates["decode_tps"].items()}
            raw_rounds.append(rates)
            print(f"  round {round_ + 1}/{args.rounds}, raw llama.cpp: decode "
                  + ", ".join(f"B={b} {v:.0f}" for b, v in rates["decode_tps"].items())
                  + f" tokens/s, prefill {rates['prefill_tps']:.0f}", flush=True)
            for c in levels:
                anchor(by_level[c][-1], rates)
        results = [summarise_level(by_level[c]) for c in levels]
        for r in results:
            print(f"  {r['concurrency']} clients: P50 {r['p50_ms']:.0f} ms, P99 {r['p99_ms']:.0f} ms, "
                  f"{r['qps']:.2f} QPS, overhead P50 {r['overhead_p50_ms']:.1f} ms", flush=True)
        batching = {t: b.batch_stats() for t, b in pool._resident.items() if hasattr(b, "batch_stats")}
        pool.close()
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    raw = {"threads": raw_rounds[0]["threads"], "rounds": raw_rounds,
           "prefill_tps": float(np.mean([r["prefill_tps"] for r in raw_rounds])),
           "decode_tps": {b: float(np.mean([r["decode_tps"][b] for r in raw_rounds])) for b in RAW_BATCHES}}

    report = {
        "meta": {**started, "git_commit": git_commit(), "command": " ".join(["python benches/pipeline.py", *argv])},
        "targets": TARGETS,
        "settings": {"config": os.path.relpath(args.config, ROOT), "overrides": sets, "tiers": cfg.inference.models,
                     "memory_nodes": args.memory_nodes, "memory_max_nodes": cfg.memory.max_nodes,
                     "n_requests": args.n_requests, "concurrency": levels, "max_tokens": args.max_tokens,
                     "warmup": args.warmup, "rounds": args.rounds, "requests_per_level": sizes,
                     "max_concurrent_requests": cfg.system.max_concurrent_requests,
                     "profile_max_concurrent": profile.system.max_concurrent_requests,
                     "profile_max_memory_mb": profile.system.max_memory_mb},
        "memory": {"peak_rss_mb": peak_rss_mb, "fill_s": fill_s, "open_s": float(np.median(open_s)),
                   "first_query_ms": warmup_ms[0],
                   "nodes_after": nodes_after, "edges_after": edges_after},
        "levels": results,
        "raw_llama_cpp": raw,
        "batching": batching,
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
