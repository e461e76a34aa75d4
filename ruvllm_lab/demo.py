"""`make demo`: the whole self-learning loop with real models, then a small routing experiment.

1. Load `configs/edge.toml` (SmolLM2-135M), answer a few questions through the full pipeline
   (embed → memory search + graph expansion → graph attention → router → llama.cpp → judge → writeback)
   and print every field of the responses.  Every question has an expected answer, and every
   answer is checked with `workloads.is_correct` (the experiments' gold matcher): a miss is
   marked `MISSES expected ...`, never printed as fine.
2. Rate a right answer; find a question the model really gets wrong (the ones asked so far,
   then harder facts from `data/knowledge.jsonl`) and correct it; ask a paraphrase
   (`data/paraphrases.jsonl`) and show the stored correction in the sources and whether the
   answer now matches.
3. Stream one answer in a session, then run `notebooks/01_routing.ipynb` through papermill at small size and
   print where its MLflow run and cost–quality figure are.

State goes to `runs/demo/` (`--state-dir`; wiped at start) so the demo always begins from an empty memory.
All generation is greedy (temperature 0), so a rerun tells the same story.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .config import Config
from .types import Constraints, Feedback, Request, Response
from .workloads import WorkItem, is_correct, load_knowledge

ROOT = Path(__file__).resolve().parent.parent
# (question, expected answer, match mode): the opening questions, each checked
QUESTIONS = [
    ("What is the capital of France?", "Paris", "text"),
    ("What is 12 + 30?", "42", "number"),
    ("What is the capital of Australia?", "Canberra", "text"),
]
SESSION = ("My name is Ada. Please remember it.", "What is my name?", "Ada")
MAX_PROBES = 12  # harder knowledge questions tried at most while looking for a real mistake
PARAPHRASES_PATH = ROOT / "data" / "paraphrases.jsonl"


@dataclass
class Checked:
    """One question, its expected answer, what the model said, and whether it matches."""
    question: str
    expected: str
    answer: str
    correct: bool
    response: Response | None = None
    match: str = "text"


def check(question: str, expected: str, response: Response, match: str = "text", aliases=()) -> Checked:
    item = WorkItem(query=question, answer=expected, family="demo", difficulty=1, match=match, aliases=tuple(aliases))
    return Checked(question, expected, response.text, is_correct(item, response.text), response, match)


def _fact_match(fact) -> str:
    """How the factual workload matches a fact's answer (``workloads._factual``)."""
    return "number" if fact.answer.isdigit() else ("case" if fact.category == "chemical_symbol" else "text")


def verdict(c: Checked) -> str:
    return f"matches expected {c.expected!r}" if c.correct else f"MISSES expected {c.expected!r}"


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


def _paraphrases() -> dict[str, list[str]]:
    if not PARAPHRASES_PATH.exists():
        return {}
    rows = [json.loads(line) for line in PARAPHRASES_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["id"]: list(r.get("paraphrases", [])) for r in rows}


def pipeline_demo(config: Config) -> dict:
    """Steps 1-3; returns what was asked and judged (the test reads it back)."""
    from .orchestrator import RuvLLM

    greedy = Constraints(temperature=0.0)
    report: dict = {"asked": [], "probes": [], "corrected": None, "after": None, "session": None}
    with RuvLLM(config) as llm:
        def ask(question: str, expected: str, match: str = "text", aliases=(), **request) -> Checked:
            r = llm.query_with(Request(question, constraints=request.pop("constraints", greedy), **request))
            c = check(question, expected, r, match, aliases)
            show(r)
            print(f"  check         : {verdict(c)}")
            return c

        _banner("1. questions through the whole pipeline (edge profile, smollm2-135m)")
        for q, expected, match in QUESTIONS:
            print(f"\nQ: {q}")
            report["asked"].append(ask(q, expected, match))

        _banner("2. feedback: a rating, and a correction for a real mistake")
        right = [c for c in report["asked"] if c.correct]
        if right:
            rid = right[0].response.request_id
            print(f"rate the right answer to {right[0].question!r} 5/5 ->", llm.feedback(Feedback(rid, rating=5)))
        wrong = next((c for c in report["asked"] if not c.correct), None)
        fact = None
        paraphrases = _paraphrases()
        facts = sorted((f for f in load_knowledge() if f.difficulty >= 2), key=lambda f: (-f.difficulty, f.id))
        if wrong is None:
            print("\nevery answer so far matches: asking harder facts from data/knowledge.jsonl until one is wrong")
            for f in facts[:MAX_PROBES]:
                print(f"\nQ: {f.question}")
                c = ask(f.question, f.answer, _fact_match(f), f.aliases)
                report["probes"].append(c)
                if not c.correct:
                    wrong, fact = c, f
                    break
        else:
            fact = next((f for f in load_knowledge() if f.question == wrong.question), None)
        if wrong is None:
            print(f"\nno wrong answer in {len(report['asked']) + len(report['probes'])} questions: nothing to correct")
        else:
            # Stated as the answer alone: the correction is stored with its question, and a small model
            # shown a quoted question echoes it instead of answering.
            fix = fact.fact if fact else f"The correct answer is {wrong.expected}."
            out = llm.feedback(Feedback(wrong.response.request_id, rating=1, correction=fix))
            print(f"\ncorrect the wrong answer {wrong.answer.strip()!r} to {wrong.question!r} with {fix!r} ->", out)
            report["corrected"] = wrong
            options = paraphrases.get(fact.id, []) if fact else []
            paraphrase = options[0] if options else wrong.question
            print(f"\nQ (paraphrase): {paraphrase}")
            after = ask(paraphrase, wrong.expected, wrong.match, fact.aliases if fact else (),
                        constraints=Constraints(model=config.inference.models[0], temperature=0.0))
            report["after"] = after
            used = any(s.kind == "correction" for s in after.response.sources)
            print(f"\n  correction retrieved: {used}; answer after the correction: {verdict(after)}")

        _banner("3. a session, streamed")
        intro, question, expected = SESSION
        session = llm.new_session()
        llm.query_with(Request(intro, session_id=session.id, constraints=greedy))
        print(f"Q: {question}  A (streamed): ", end="", flush=True)
        chunks = []
        for chunk in llm.query_stream(Request(question, session_id=session.id, constraints=greedy)):
            chunks.append(chunk)
            print(chunk, end="", flush=True)
        text = "".join(chunks)
        item = WorkItem(query=question, answer=expected, family="demo", difficulty=1)
        report["session"] = Checked(question, expected, text, is_correct(item, text))
        print(f"\n  check         : {verdict(report['session'])}")

        _banner("health")
        h = llm.health()
        print(f"  overall: {h.overall}")
        for name in ("memory", "router", "inference"):
            c = getattr(h, name)
            print(f"  {name:<10} healthy={c.healthy} latency_ms={c.latency_ms or 0:.1f} {c.error or c.details}")
        print(f"  memory nodes: {llm.memory.count()}")
    checked = report["asked"] + report["probes"] + [c for c in (report["after"], report["session"]) if c]
    misses = [c for c in checked if not c.correct]
    print(f"\n{len(checked) - len(misses)}/{len(checked)} answers match their expected value"
          + (f"; misses: {', '.join(repr(c.question) for c in misses)}" if misses else ""))
    return report


def routing_demo(n_queries: int, out_dir: Path) -> dict:
    from .experiments.runner import execute_notebook

    _banner(f"4. routing experiment: notebooks/01_routing.ipynb via papermill ({n_queries} queries)")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}")
    (ROOT / "mlruns").mkdir(exist_ok=True)
    out = out_dir / "01_routing.ipynb"
    record = execute_notebook(ROOT / "notebooks" / "01_routing.ipynb", out,
                              {"n_queries": n_queries, "config_path": "configs/edge.toml",
                               "tiers": ["smollm2-135m", "qwen2.5-coder-0.5b"], "seeds": [0, 1, 2],
                               "feedback": ["bandit"], "experiment_name": "ruvllm-demo-routing"}, cwd=ROOT)
    print(f"  {record['status']} in {record['seconds']:.0f} s -> {out}"
          + (f"  ({record['error']})" if record["error"] else ""))
    if out.exists():
        import nbformat
        nb = nbformat.read(out, as_version=4)
        for cell in nb.cells:
            for o in cell.get("outputs", []):
                if o.get("output_type") == "display_data" and "text/markdown" in o.get("data", {}):
                    print(o["data"]["text/markdown"])
        for o in nb.cells[-1].get("outputs", []):
            if o.get("name") == "stdout":
                print("  " + o["text"].strip().replace("\n", "\n  "))
    print(f"  browse: make mlflow-ui  (MLFLOW_TRACKING_URI={os.environ['MLFLOW_TRACKING_URI']}); "
          f"compare runs: notebooks/04_results.ipynb")
    return record


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
        record = routing_demo(args.n_queries, state / "notebooks")
        return 0 if record["status"] == "ok" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
