"""`make demo`: the whole self-learning loop with real models, then a small routing experiment.

1. Load `configs/edge.toml` (SmolLM2-135M), answer a few questions through the full pipeline
   (embed → memory search + graph expansion → graph attention → router → llama.cpp → judge → writeback)
   and print every field of the responses.
2. Rate an answer and correct a wrong one; ask a paraphrase and show the stored correction in the
   sources and in the answer.
3. Stream one answer, then run `notebooks/01_routing.ipynb` through papermill at small size and
   print where its MLflow run and cost–quality figure are.

State goes to `runs/demo/` (`--state-dir`; wiped at start) so the demo always begins from an empty memory.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .config import Config
from .types import Constraints, Feedback, Request, Response

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "What is the capital of France?",
    "What is 12 + 30?",
    "What is the capital of Australia?",
]
CORRECTION = ("What is the capital of Australia?", "The capital of Australia is Canberra.")
PARAPHRASE = "Which city is Australia's capital city?"


def _banner(title: str) -> None:
    print(f"\n{'=' * 8} {title} {'=' * (70 - len(title))}", flush=True)


def show(r: Response) -> None:
    """Print every field of a Response, sources and per-stage latency included."""
    print(f"  text          : {r.text.strip()!r}")
    print(f"  confidence    : {r.confidence:.3f}    finish_reason: {r.finish_reason}    request_id: {r.request_id}")
    ri = r.routing_info
    print(f"  routing_info  : tier={ri.get('tier')} router={ri.get('router')} "
          f"confidence={ri.get('confidence', float('nan')):.3f} fallback={ri.get('fallback_used')} "
          f"forced={ri.get('forced')} context_items={ri.get('context_items')} "
          f"temperature={ri.get('temperature')} top_p={ri.get('top_p')}")
    print(f"  usage         : prompt={r.usage.prompt_tokens} evaluated={r.usage.prompt_tokens_evaluated} "
          f"completion={r.usage.completion_tokens}")
    print("  latency_ms    : " + ", ".join(f"{k}={v:.1f}" for k, v in r.latency_ms.items()))
    for s in r.sources or []:
        print(f"  source        : node {s.node_id} [{s.kind}] score={s.score:.3f} {s.text[:70]!r}")
    if not r.sources:
        print("  source        : (none yet: memory is empty)")


def pipeline_demo(config: Config) -> None:
    from .orchestrator import RuvLLM

    with RuvLLM(config) as llm:
        _banner("1. questions through the whole pipeline (edge profile, smollm2-135m)")
        answers = {}
        for q in QUESTIONS:
            print(f"\nQ: {q}")
            r = llm.query(q)
            answers[q] = r
            show(r)

        _banner("2. feedback: a rating, and a correction for a wrong answer")
        first = answers[QUESTIONS[0]]
        print(f"rate {first.request_id} 5/5 ->", llm.feedback(Feedback(first.request_id, rating=5)))
        q, fix = CORRECTION
        out = llm.feedback(Feedback(answers[q].request_id, rating=1, correction=fix))
        print(f"correct {answers[q].request_id} with {fix!r} ->", out)

        print(f"\nQ (paraphrase): {PARAPHRASE}")
        again = llm.query_with(Request(PARAPHRASE, constraints=Constraints(model=config.inference.models[0],
                                                                          temperature=0.0)))
        show(again)
        used = any(s.kind == "correction" for s in again.sources)
        print(f"\n  correction retrieved: {used}; answer mentions Canberra: {'canberra' in again.text.lower()}")

        _banner("3. a session, streamed")
        session = llm.new_session()
        llm.query_session(session, "My name is Ada. Please remember it.")
        print("Q: What is my name?  A (streamed): ", end="", flush=True)
        for chunk in llm.query_stream(Request("What is my name?", session_id=session.id)):
            print(chunk, end="", flush=True)
        print()

        _banner("health")
        h = llm.health()
        print(f"  overall: {h.overall}")
        for name in ("memory", "router", "inference"):
            c = getattr(h, name)
            print(f"  {name:<10} healthy={c.healthy} latency_ms={c.latency_ms or 0:.1f} {c.error or c.details}")
        print(f"  memory nodes: {llm.memory.count()}")


def routing_demo(n_queries: int) -> None:
    import papermill as pm

    _banner(f"4. routing experiment: notebooks/01_routing.ipynb via papermill ({n_queries} queries)")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}")
    (ROOT / "mlruns").mkdir(exist_ok=True)
    out = ROOT / "notebooks" / "out" / "01_routing.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    nb = pm.execute_notebook(str(ROOT / "notebooks" / "01_routing.ipynb"), str(out), kernel_name="python3",
                             parameters={"n_queries": n_queries, "experiment_name": "ruvllm-demo-routing"},
                             cwd=str(ROOT), progress_bar=False)
    print(f"  executed in {time.perf_counter() - t0:.0f} s -> {out.relative_to(ROOT)}")
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "display_data" and "text/markdown" in o.get("data", {}):
                print(o["data"]["text/markdown"])
    for o in nb.cells[-1].get("outputs", []):
        if o.get("name") == "stdout":
            print("  " + o["text"].strip().replace("\n", "\n  "))
    print(f"  browse: make mlflow-ui  (MLFLOW_TRACKING_URI={os.environ['MLFLOW_TRACKING_URI']})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "edge.toml"))
    p.add_argument("--n-queries", type=int, default=30, help="routing experiment size")
    p.add_argument("--skip-routing", action="store_true")
    p.add_argument("--state-dir", default=str(ROOT / "runs" / "demo"), help="wiped at start")
    args = p.parse_args(argv)

    state = Path(args.state_dir)
    shutil.rmtree(state, ignore_errors=True)
    config = Config.load(args.config, overrides={"memory.db_path": str(state / "memory.db"),
                                                 "system.data_dir": str(state / "state")})
    pipeline_demo(config)
    if not args.skip_routing:
        routing_demo(args.n_queries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
