"""lm-evaluation-harness against the OpenAI-compatible endpoint: accuracy per tier and for ruvllm-auto.

    python experiments/harness_eval.py [--config configs/edge.toml] [--n 40] [--seed 0]
                                       [--models smollm2-135m ruvllm-auto] [--driver lm-eval|openai]

The items are the lab's own graded workloads (``ruvllm_lab.workloads.generate(n, seed,
distinct=True)``), written to ``data/harness/workloads.jsonl``; the lm-eval task is
``data/harness/ruvllm_workloads.yaml`` (``generate_until``, greedy, at most ``--max-tokens`` tokens,
stop at a blank line), scored by ``ruvllm_lab.workloads.is_correct`` (``data/harness/ruvllm_metric.py``).
Nothing is downloaded: the dataset is a local JSON file read by the ``datasets`` package's built-in
json builder, and ``local-chat-completions`` needs no tokenizer for generation tasks.

Every model (each tier of the config, then ``ruvllm-auto``) is evaluated on its own fresh
``ruvllm serve`` (empty memory and learned state), so one model's stored answers never become
another's memory notes. Within a run the loop is live: each answer is judged and written back
before the next question, no feedback is given. ``ruvllm-auto``'s tier shares come from the
server's ``ruvllm_requests_total`` counter.

``--driver openai`` asks the same questions with the official ``openai`` client instead of lm-eval
(same messages, ``max_tokens``, ``temperature=0`` and stop sequence), for machines without lm-eval.

Writes ``experiments/results/harness_eval_<profile>.md`` and ``.json`` and one MLflow run in the
experiment ``ruvllm-harness``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
HARNESS_DIR = ROOT / "data" / "harness"
DATA_FILE = HARNESS_DIR / "workloads.jsonl"  # the path ruvllm_workloads.yaml names
TASK = "ruvllm_workloads"
STOP = ["\n\n"]  # the task's `until`
SERVER_START_S = 300  # loading a tier and the embedder on a busy 2-core machine
TIMEOUT_S = 300  # per model-backed request: never short
MIN_ITEMS = 30  # below this a per-model accuracy is flagged underpowered

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ruvllm_lab import workloads  # noqa: E402
from ruvllm_lab.config import Config  # noqa: E402
from ruvllm_lab.experiments.metrics import bootstrap_ci  # noqa: E402
from ruvllm_lab.server.openai_types import AUTO_MODEL  # noqa: E402


class Served:
    """A fresh `ruvllm serve` on a free loopback port with its own store, state and API key."""

    def __init__(self, config_path: str, overrides: list[str], workdir: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.key = f"http://127.0.0.1:{self.port}", secrets.token_hex(16)
        args = [sys.executable, "-m", "ruvllm_lab", "serve", "--config", config_path, "--host", "127.0.0.1",
                "--port", str(self.port)]
        for o in [f"memory.db_path={workdir / 'memory.db'}", f"system.data_dir={workdir / 'state'}",
                  "server.rate_limit_per_minute=0", *overrides]:
            args += ["--set", o]
        self.log = open(workdir / "server.log", "w")
        self.proc = subprocess.Popen(args, env={**os.environ, "RUVLLM_API_KEYS": self.key}, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(workdir / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=30).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server did not come up in {SERVER_START_S} s")

    def tier_counts(self) -> dict[str, int]:
        text = httpx.get(f"{self.url}/v1/metrics", headers={"Authorization": f"Bearer {self.key}"},
                         timeout=TIMEOUT_S).text
        return {tier: int(float(count)) for tier, count in re.findall(
            r'^ruvllm_requests_total\{tier="([^"]+)"\} (\S+)$', text, re.M) if float(count) > 0}

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def write_items(items: list) -> None:
    """The task's data file, replaced atomically and only when it changes (another run may be reading it)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = workloads.save_jsonl(items, Path(tmp) / DATA_FILE.name)
        if not DATA_FILE.exists() or DATA_FILE.read_bytes() != fresh.read_bytes():
            staged = DATA_FILE.with_suffix(".jsonl.tmp")
            staged.write_bytes(fresh.read_bytes())
            staged.replace(DATA_FILE)


def run_lm_eval(served: Served, model: str, max_tokens: int) -> list[tuple[dict, str]]:
    """lm-eval's local-chat-completions on the task; returns (doc, answer) per item, in item order."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.environ["OPENAI_API_KEY"] = served.key  # how local-chat-completions authenticates
    results = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args={"model": model, "base_url": f"{served.url}/v1/chat/completions", "num_concurrent": 1,
                    "max_retries": 1, "timeout": TIMEOUT_S, "tokenized_requests": False},
        tasks=[TASK], task_manager=TaskManager(include_path=str(HARNESS_DIR)), apply_chat_template=True,
        gen_kwargs={"max_gen_toks": max_tokens}, log_samples=True, random_seed=0, numpy_random_seed=0,
        torch_random_seed=0, fewshot_random_seed=0)
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return [(s["doc"], s["filtered_resps"][0] if isinstance(s["filtered_resps"][0], str)
             else s["filtered_resps"][0][0]) for s in samples]


def run_openai(served: Served, model: str, max_tokens: int, docs: list[dict]) -> list[tuple[dict, str]]:
    """The same questions through the official openai client."""
    import openai

    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=served.key, timeout=TIMEOUT_S, max_retries=0)
    out = []
    for doc in docs:
        done = client.chat.completions.create(model=model, messages=[{"role": "user", "content": doc["query"]}],
                                              max_tokens=max_tokens, temperature=0, stop=STOP)
        out.append((doc, done.choices[0].message.content))
    return out


def score(answers: list[tuple[dict, str]]) -> dict:
    sys.path.insert(0, str(HARNESS_DIR))
    from ruvllm_metric import work_item  # the task's own scorer, so both drivers score alike

    correct = [float(workloads.is_correct(work_item(doc), answer)) for doc, answer in answers]
    mean, low, high = bootstrap_ci(correct, seed=0)
    families: dict[str, list[float]] = {}
    for (doc, _), c in zip(answers, correct):
        families.setdefault(doc["family"], []).append(c)
    return {"n": len(correct), "accuracy": mean, "ci_low": low, "ci_high": high,
            "per_family": {f: sum(v) / len(v) for f, v in sorted(families.items())},
            "family_n": {f: len(v) for f, v in sorted(families.items())},
            "answers": [{"query": d["query"], "gold": d["answer"], "answer": a, "correct": bool(c)}
                        for (d, a), c in zip(answers, correct)]}


def markdown(rows: list[dict], families: list[str], command: str, profile: str, driver: str, seconds: float) -> str:
    family_n = rows[0]["family_n"]  # every model answers the same items
    head = ("| model | n | accuracy | 95 % CI | " + " | ".join(f"{f} (n={family_n[f]})" for f in families)
            + " | tiers that answered | wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        tiers = ", ".join(f"{t} {c}" for t, c in r["tiers"].items())
        lines.append(f"| `{r['model']}` | {r['n']} | {r['accuracy']:.3f} | {r['ci_low']:.3f}–{r['ci_high']:.3f} | "
                     + " | ".join(f"{r['per_family'].get(f, float('nan')):.2f}" for f in families)
                     + f" | {tiers} | {r['seconds']:.0f} |")
    return (f"# Harness evaluation, {profile} profile ({time.strftime('%Y-%m-%d')})\n\n"
            f"Driver: {driver}. Command: `{command}`; {seconds:.0f} s in all. Accuracy = share of items "
            f"`ruvllm_lab.workloads.is_correct` accepts; CI = 95 % percentile bootstrap over items (one seed); "
            f"per-family columns are accuracies. Each model on a fresh server (empty memory), no feedback.\n\n"
            + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/edge.toml")
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="*", help="default: every tier of the config, then ruvllm-auto")
    p.add_argument("--driver", choices=("lm-eval", "openai"), default="lm-eval")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for every server (repeatable)")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    p.add_argument("--no-mlflow", action="store_true")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so each server is stopped, not orphaned
    os.chdir(ROOT)  # the task names its data file relative to the repository root
    config = Config.load(args.config, overrides=args.set or None)
    profile = Path(args.config).stem
    models = args.models or [*map(str, config.inference.models), AUTO_MODEL]
    items = workloads.generate(n=args.n, seed=args.seed, distinct=True)
    write_items(items)
    docs = [json.loads(line) for line in DATA_FILE.read_text().splitlines() if line.strip()]
    command = "python experiments/harness_eval.py " + " ".join(argv if argv is not None else sys.argv[1:])

    t_all, rows = time.perf_counter(), []
    for model in models:
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"harness-{model}-") as tmp:
            served = Served(args.config, args.set, Path(tmp))
            try:
                answers = (run_lm_eval(served, model, args.max_tokens) if args.driver == "lm-eval"
                           else run_openai(served, model, args.max_tokens, docs))
                tiers = served.tier_counts()
            finally:
                served.stop()
        row = {"model": model, **score(answers), "tiers": tiers, "seconds": time.perf_counter() - t}
        rows.append(row)
        print(f"{model}: accuracy {row['accuracy']:.3f} ({row['ci_low']:.3f}-{row['ci_high']:.3f}), n={row['n']}, "
              f"tiers {tiers}, {row['seconds']:.0f} s", flush=True)
    seconds = time.perf_counter() - t_all

    families = sorted({f for r in rows for f in r["per_family"]})
    md = markdown(rows, families, command, profile, args.driver, seconds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"harness_eval_{profile}.md").write_text(md)
    (out / f"harness_eval_{profile}.json").write_text(json.dumps(
        {"command": command, "profile": profile, "driver": args.driver, "n": args.n, "seed": args.seed,
         "max_tokens": args.max_tokens, "rows": rows}, indent=2, default=str))
    print(md)
    if not args.no_mlflow:
        log_mlflow(rows, md, args, config, profile, command)
    return 0


def log_mlflow(rows: list[dict], md: str, args, config: Config, profile: str, command: str) -> None:
    import pandas as pd

    from ruvllm_lab.experiments.tracking import MLflowTracker, log_experiment, mark_underpowered, readable_run_name

    with MLflowTracker("ruvllm-harness", run_name=readable_run_name("harness", profile=profile, n=args.n,
                                                                   driver=args.driver),
                       tags={"driver": args.driver, "profile": profile, "command": command}) as tr:
        log_experiment(tr, config, {"n": args.n, "seed": args.seed, "max_tokens": args.max_tokens,
                                    "driver": args.driver, "models": [r["model"] for r in rows]})
        for r in rows:
            tr.log_metrics({f"{r['model']}/accuracy": r["accuracy"], f"{r['model']}/ci_low": r["ci_low"],
                            f"{r['model']}/ci_high": r["ci_high"],
                            **{f"{r['model']}/family/{f}": a for f, a in r["per_family"].items()}})
        tr.log_table(pd.DataFrame([{k: v for k, v in r.items() if k != "answers"} for r in rows]), "harness.csv")
        tr.log_text(json.dumps([{"model": r["model"], "answers": r["answers"]} for r in rows], indent=1),
                    "answers.json")
        tr.log_text(md, "harness.md")
        mark_underpowered(tr, [f"{args.n} items per model (< {MIN_ITEMS})"] if args.n < MIN_ITEMS else [],
                          "harness")


if __name__ == "__main__":
    sys.exit(main())
