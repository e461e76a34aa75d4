"""Soak: does a long-running server hold its memory, file descriptors and threads per query?

    flock /tmp/ruvllm-long.lock nice -n 10 .venv/bin/python benches/soak.py --n 1000   # ~1 h on 2 cores
    .venv/bin/python benches/soak.py --n 60 --warmup 20 --out /tmp/soak                # smoke run

A real `ruvllm serve` (edge profile, smollm2-135m, fresh store and data dir under a temp dir, rate
limit off, learning at its configured interval) answers `--n` distinct questions one after another
(ruvllm_lab.workloads.generate, `--max-tokens` each, a rating on every fourth answer so the learning
records grow too).  Every `--sample-every` queries the server process's RSS, open file descriptors
and threads are read with psutil.

Growth per query is the least-squares slope of RSS over the query count, fitted to the samples
after `--warmup` queries (model load, caches filling, allocator arenas settling); its 95 % interval
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


def sample(proc: psutil.Process, done: int) -> dict:
    with proc.oneshot():
        return {"queries": done, "rss_mb": proc.memory_info().rss / 2**20, "fds": proc.num_fds(),
                "threads": proc.num_threads(), "t": time.time()}


def slope_kb(samples: list[dict], warmup: int) -> dict:
    pts = [(s["queries"], s["rss_mb"] * 1024) for s in samples if s["queries"] >= warmup]
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
                 *args.set]
    cmd = [sys.executable, "-m", "ruvllm_lab", "serve", "--config", args.config, "--host", "127.0.0.1",
           "--port", str(port)] + [a for o in overrides for a in ("--set", o)]
    log = open(tmp / "server.log", "w")
    server = subprocess.Popen(cmd, env={**os.environ, "RUVLLM_API_KEYS": KEY}, stdout=log, stderr=subprocess.STDOUT)
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
        samples = [sample(proc, 0)]
        failures = 0
        t0 = time.time()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=REQUEST_TIMEOUT_S) as c:
            for i, q in enumerate(queries, 1):
                r = c.post("/v1/query", json={"query": q, "constraints": {"max_tokens": args.max_tokens}})
                if r.status_code != 200:
                    failures += 1
                elif i % 4 == 0:
                    c.post("/v1/feedback", json={"request_id": r.json()["request_id"], "rating": 1 + i % 5})
                if i % args.sample_every == 0 or i == len(queries):
                    samples.append(sample(proc, i))
                    s = samples[-1]
                    print(f"{i:5d} queries  rss {s['rss_mb']:.1f} MB  fds {s['fds']}  threads {s['threads']}",
                          flush=True)
        wall = time.time() - t0
    finally:
        server.send_signal(signal.SIGTERM)
        rc = server.wait(timeout=600)
        log.close()
    warm = next(s for s in samples if s["queries"] >= args.warmup)
    end = samples[-1]
    fit = slope_kb(samples, args.warmup)
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "config": args.config, "overrides": args.set, "n_queries": args.n, "warmup": args.warmup,
        "max_tokens": args.max_tokens, "seed": args.seed, "failures": failures, "wall_s": wall,
        "server_exit_code": rc,
        "start": samples[0], "after_warmup": warm, "end": end,
        "rss_growth_kb_per_query_after_warmup": fit["kb_per_query"], "rss_growth_ci95": fit["ci95"],
        "fit_points": fit["points"], "target_kb_per_query": TARGET_KB_PER_QUERY,
        "fd_change_after_warmup": end["fds"] - warm["fds"], "thread_change_after_warmup": end["threads"] - warm["threads"],
        "samples": samples,
    }


def markdown(res: dict) -> str:
    s, w, e = res["start"], res["after_warmup"], res["end"]
    lo, hi = res["rss_growth_ci95"]
    ok = "pass" if res["rss_growth_kb_per_query_after_warmup"] < res["target_kb_per_query"] else "miss"
    return "\n".join([
        f"# Soak ({res['n_queries']} queries, edge profile, {res['date']})",
        "",
        f"`benches/soak.py --n {res['n_queries']} --warmup {res['warmup']} --max-tokens {res['max_tokens']}` "
        f"({res['machine']['cpus']} CPUs; seed {res['seed']}; {res['failures']} failed queries; "
        f"{res['wall_s']:.0f} s; server exit code {res['server_exit_code']})",
        "",
        "| | queries | RSS (MB) | open fds | threads |",
        "|---|---|---|---|---|",
        f"| start | {s['queries']} | {s['rss_mb']:.1f} | {s['fds']} | {s['threads']} |",
        f"| after warm-up | {w['queries']} | {w['rss_mb']:.1f} | {w['fds']} | {w['threads']} |",
        f"| end | {e['queries']} | {e['rss_mb']:.1f} | {e['fds']} | {e['threads']} |",
        "",
        f"RSS growth after warm-up: **{res['rss_growth_kb_per_query_after_warmup']:.2f} KB/query** "
        f"(least-squares over {res['fit_points']} samples, ±1.96 SE: {lo:.2f} .. {hi:.2f}); target "
        f"< {res['target_kb_per_query']:.0f} KB/query: {ok}.  Open fds {res['fd_change_after_warmup']:+d}, "
        f"threads {res['thread_change_after_warmup']:+d} after warm-up.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000, help="queries")
    p.add_argument("--warmup", type=int, default=100, help="queries before the growth fit starts")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--sample-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=str(ROOT / "configs" / "edge.toml"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
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
