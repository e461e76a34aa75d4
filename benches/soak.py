"""Soak: does a long-running server hold its memory, file descriptors and threads per query?

    flock /tmp/ruvllm-heavy.lock .venv/bin/python benches/soak.py --n 1550 --warmup 100  # ~5 min on 2 cores
    .venv/bin/python benches/soak.py --n 60 --warmup 20 --warmup-cycles 0 --out /tmp/soak  # smoke run

A real `ruvllm serve` (edge profile, smollm2-135m, fresh store and data dir under a temp dir, rate
limit off) answers `--n` distinct questions one after another
(ruvllm_lab.workloads.generate, `--max-tokens` each, a rating on every fourth answer so the learning
records grow too).  Every `--sample-every` queries the server process's RSS, open file descriptors
and threads are read with psutil.

The server runs a learning cycle every `--learn-every` answers (its `learning.max_pending`; the
default server learns every 512 answers or 5 minutes), so the measured part holds several cycles.
Every sample also scrapes the server's own memory breakdown (``ruvllm_process_memory_bytes`` in
/v1/metrics: anonymous and file-backed RSS, glibc heap in use and free, SQLite) and its learning
cycles.

Growth per query is the least-squares slope of RSS over the query count, fitted to the samples
after warm-up: `--warmup` queries (model load, caches filling, allocator arenas settling) and the
first `--warmup-cycles` learning cycles (default 2).  The first cycle pages torch's training code in
and starts its threads; the second is the first to replay old examples and to apply the EWC penalty
of the first cycle's Fisher, so it runs code the first did not.  From the third on every cycle runs
the same code.  The step of *every* cycle is reported (RSS between the samples around it), so a
cycle that keeps adding memory shows there and in the fit.  Its 95 % interval
is slope +- 1.96 standard errors (normal approximation over the samples; one run, one seed -- the
samples are not independent, so read it as a fit quality, not a sampling CI).  The memory store
itself grows by design (each answer is a node with a 384-d vector and its index links), so this
is the whole process, store included.

Writes benches/results/soak.{json,md} (or --out DIR).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import psutil  # noqa: E402

from ruvllm_lab import workloads  # noqa: E402

TARGET_KB_PER_QUERY = 10.0  # issue 14: RSS growth after warm-up
KEY = "soak-key"
REQUEST_TIMEOUT_S = 300  # a model-backed call is never cut short


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MEMORY_PARTS = ("rss_anon", "rss_file", "malloc_in_use", "malloc_free", "sqlite")  # telemetry.process_memory


def scrape_memory_parts(client: httpx.Client) -> dict[str, float]:
    """The server's own memory breakdown (``<part>_mb``, from ``ruvllm_process_memory_bytes``) and the
    learning cycles it has run (``learning_cycles``), from /v1/metrics."""
    out = {}
    text = client.get("/v1/metrics").text
    for m in re.finditer(r'^ruvllm_process_memory_bytes\{part="(\w+)"\} (\S+)$', text, re.M):
        out[f"{m.group(1)}_mb"] = float(m.group(2)) / 2**20
    cycles = re.search(r"^ruvllm_learning_cycles_total (\S+)$", text, re.M)
    if cycles:
        out["learning_cycles"] = int(float(cycles.group(1)))
    return out


def sample(proc: psutil.Process, done: int, client: httpx.Client | None = None) -> dict:
    with proc.oneshot():
        s = {"queries": done, "rss_mb": proc.memory_info().rss / 2**20, "fds": proc.num_fds(),
             "threads": proc.num_threads(), "t": time.time()}
    if client is not None:
        s.update(scrape_memory_parts(client))
    return s


def slope_kb(samples: list[dict], warmup: int, key: str = "rss_mb", until: int | None = None) -> dict:
    """Least-squares KB per query of `key` over the samples from `warmup` to `until` queries."""
    pts = [(s["queries"], s[key] * 1024) for s in samples
           if s["queries"] >= warmup and (until is None or s["queries"] <= until) and key in s]
    if len(pts) < 3:
        return {"kb_per_query": float("nan"), "ci95": [float("nan"), float("nan")], "points": len(pts)}
    x, y = np.array(pts, dtype=float).T
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    se = float(np.sqrt(resid @ resid / (len(x) - 2) / ((x - x.mean()) @ (x - x.mean()))))
    return {"kb_per_query": float(b), "ci95": [float(b - 1.96 * se), float(b + 1.96 * se)], "points": len(pts)}


def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="ruvllm-soak-"))
    port = free_port()
    overrides = [f"memory.db_path={tmp / 'memory.db'}", f"system.data_dir={tmp / 'state'}",
                 "server.rate_limit_per_minute=0", f"server.max_tokens_limit={args.max_tokens}",
                 f"learning.max_pending={args.learn_every}", *args.set]
    cmd = [sys.executable, "-m", "ruvllm_lab", "serve", "--config", args.config, "--host", "127.0.0.1",
           "--port", str(port)] + [a for o in overrides for a in ("--set", o)]
    log = open(tmp / "server.log", "w")
    server = subprocess.Popen(cmd, env={**os.environ, **dict(e.split("=", 1) for e in args.env), "RUVLLM_API_KEYS": KEY}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited: {(tmp / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/v1/health", timeout=30).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        proc = psutil.Process(server.pid)
        queries = [item.query for item in workloads.generate(n=args.n, seed=args.seed)]
        failures = 0
        t0 = time.time()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=REQUEST_TIMEOUT_S) as c:
            samples = [sample(proc, 0, c)]
            for i, q in enumerate(queries, 1):
                r = c.post("/v1/query", json={"query": q, "constraints": {"max_tokens": args.max_tokens}})
                if r.status_code != 200:
                    failures += 1
                elif i % 4 == 0:
                    c.post("/v1/feedback", json={"request_id": r.json()["request_id"], "rating": 1 + i % 5})
                if i % args.sample_every == 0 or i == len(queries):
                    samples.append(sample(proc, i, c))
                    s = samples[-1]
                    parts = "  ".join(f"{k} {s[k + '_mb']:.1f}" for k in MEMORY_PARTS if k + "_mb" in s)
                    print(f"{i:5d} queries  rss {s['rss_mb']:.1f} MB  fds {s['fds']}  threads {s['threads']}  "
                          f"({parts})", flush=True)
        wall = time.time() - t0
    finally:
        server.send_signal(signal.SIGTERM)
        rc = server.wait(timeout=600)
        log.close()
    # Warm-up ends after --warmup queries *and* --warmup-cycles learning cycles (module docstring).
    warm = next((x for x in samples if args.warmup <= x["queries"] < args.n
                 and x.get("learning_cycles", args.warmup_cycles) >= args.warmup_cycles),
                None) or next(x for x in samples if x["queries"] >= args.warmup)
    warmup_end = warm["queries"]
    cycle_steps = []  # the memory each learning cycle added: the samples just before and just after it
    for i in range(1, len(samples)):
        before, after = samples[i - 1], samples[i]
        if after.get("learning_cycles", 0) > before.get("learning_cycles", 0):
            cycle_steps.append({"cycles": [before.get("learning_cycles", 0) + 1, after["learning_cycles"]],
                                "between_queries": [before["queries"], after["queries"]],
                                **{f"{k}_mb": after.get(f"{k}_mb", float("nan")) - before.get(f"{k}_mb", float("nan"))
                                   for k in ("rss", *MEMORY_PARTS)}})
    end = samples[-1]
    fit = slope_kb(samples, warmup_end)
    # the same fit for each part of the server's memory, and RSS over each third of the measured range
    parts = {k: slope_kb(samples, warmup_end, f"{k}_mb")["kb_per_query"] for k in MEMORY_PARTS
             if f"{k}_mb" in end}
    cuts = np.linspace(warmup_end, args.n, 4).round().astype(int).tolist()
    thirds = [{"from": a, "to": b, "kb_per_query": slope_kb(samples, a, until=b)["kb_per_query"]}
              for a, b in zip(cuts, cuts[1:])]
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "config": args.config, "overrides": args.set, "env": args.env, "n_queries": args.n, "warmup": args.warmup,
        "learn_every": args.learn_every, "warmup_cycles": args.warmup_cycles, "warmup_end_query": warmup_end,
        "learning_cycle_steps": cycle_steps,
        "learning_cycles": end.get("learning_cycles"),
        "max_tokens": args.max_tokens, "sample_every": args.sample_every, "seed": args.seed, "failures": failures, "wall_s": wall,
        "server_exit_code": rc,
        "start": samples[0], "after_warmup": warm, "end": end,
        "rss_growth_kb_per_query_after_warmup": fit["kb_per_query"], "rss_growth_ci95": fit["ci95"],
        "fit_points": fit["points"], "target_kb_per_query": TARGET_KB_PER_QUERY,
        "growth_kb_per_query_by_part": parts, "rss_growth_by_third": thirds,
        "fd_change_after_warmup": end["fds"] - warm["fds"], "thread_change_after_warmup": end["threads"] - warm["threads"],
        "samples": samples,
    }


def markdown(res: dict) -> str:
    s, w, e = res["start"], res["after_warmup"], res["end"]
    lo, hi = res["rss_growth_ci95"]
    ok = "pass" if res["rss_growth_kb_per_query_after_warmup"] < res["target_kb_per_query"] else "miss"
    parts = [k for k in MEMORY_PARTS if f"{k}_mb" in e]
    head = "| | queries | RSS (MB) | " + " | ".join(f"{k} (MB)" for k in parts) + " | open fds | threads |"
    rows = [f"| {name} | {x['queries']} | {x['rss_mb']:.1f} | "
            + " | ".join(f"{x.get(k + '_mb', float('nan')):.1f}" for k in parts) + f" | {x['fds']} | {x['threads']} |"
            for name, x in (("start", s), ("after warm-up", w), ("end", e))]
    by_part = ", ".join(f"{k} {v:+.2f}" for k, v in res.get("growth_kb_per_query_by_part", {}).items())
    thirds = ", ".join(f"{t['kb_per_query']:.1f} over {t['from']}-{t['to']}" for t in res.get("rss_growth_by_third", []))
    return "\n".join([
        f"# Soak ({res['n_queries']} queries, edge profile, {res['date']})",
        "",
        f"`benches/soak.py --n {res['n_queries']} --warmup {res['warmup']} --warmup-cycles {res['warmup_cycles']} "
        f"--max-tokens {res['max_tokens']} "
        f"--learn-every {res['learn_every']}"
        + "".join(f" --set {o}" for o in res["overrides"]) + "".join(f" --env {o}" for o in res.get("env", []))
        + f"` ({res['machine']['cpus']} CPUs; seed {res['seed']}; {res['failures']} failed queries; "
        f"{res['wall_s']:.0f} s; server exit code {res['server_exit_code']})",
        "",
        head,
        "|" + "---|" * (5 + len(parts)),
        *rows,
        "",
        f"RSS growth after warm-up: **{res['rss_growth_kb_per_query_after_warmup']:.2f} KB/query** "
        f"(least-squares over {res['fit_points']} samples, ±1.96 SE: {lo:.2f} .. {hi:.2f}); target "
        f"< {res['target_kb_per_query']:.0f} KB/query: {ok}.  By third: {thirds} KB/query.  "
        f"Open fds {res['fd_change_after_warmup']:+d}, threads {res['thread_change_after_warmup']:+d} after warm-up.",
        "",
        f"Warm-up: {res['warmup']} queries and {res['warmup_cycles']} learning cycles, ended at query "
        f"{res['warmup_end_query']} (learning cycle every {res['learn_every']} answers; {res['learning_cycles']} "
        f"cycles in the run).  Memory added by each cycle (MB between the samples around it, which also hold "
        f"{res['sample_every']} queries of ordinary growth):",
        "",
        "| cycle | between queries | RSS | rss_file | malloc_in_use | malloc_free |",
        "|---|---|---|---|---|---|",
        *[f"| {'-'.join(map(str, sorted(set(c['cycles']))))} | {c['between_queries'][0]}-{c['between_queries'][1]} | "
          f"{c['rss_mb']:+.1f} | {c.get('rss_file_mb', float('nan')):+.1f} | "
          f"{c.get('malloc_in_use_mb', float('nan')):+.1f} | {c.get('malloc_free_mb', float('nan')):+.1f} |"
          for c in res["learning_cycle_steps"]],
        "",
        f"Growth by part after warm-up (KB/query, same fit; the parts overlap: malloc and sqlite live in "
        f"rss_anon): {by_part}.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1550, help="queries (the default measures ~1000 after warm-up)")
    p.add_argument("--warmup", type=int, default=100, help="queries before the growth fit starts (it also waits "
                   "for --warmup-cycles learning cycles)")
    p.add_argument("--warmup-cycles", type=int, default=2, help="learning cycles before the growth fit starts")
    p.add_argument("--learn-every", type=int, default=250, help="learning.max_pending of the server: a learning "
                   "cycle after this many answers, so the measured part holds several cycles")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--sample-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=str(ROOT / "configs" / "edge.toml"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment of the server process (e.g. MALLOC_ARENA_MAX=2)")
    p.add_argument("--out", default=str(ROOT / "benches" / "results"))
    args = p.parse_args(argv)
    if args.warmup >= args.n:
        p.error("--warmup must be smaller than --n")
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (out / "soak.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
