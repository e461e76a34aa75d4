"""Which note layout lets a small tier use a verified answer?  Chosen on the calib split only.

    python experiments/note_layouts.py [--config configs/server-cpu.toml] [--tiers T ...] [--max-tokens 32]

The largest tier answers every calib-split question of ``data/memory_eval.jsonl`` (greedy); its
answers that pass the strict matcher become the notes, as verified answers would be in serving.
Each answering tier (``--tiers``, default the two smallest) then answers the question and both
paraphrases with that one note, rendered by
``ContextBuilder.messages`` under each layout of ``LAYOUTS`` (``[prompt] answer_note`` and
``question_with_notes``), and without a note.  The eval split is left for the memory ablation
(``notebooks/05_memory.ipynb``), so choosing the layout here does not tune on what it reports.
Writes experiments/results/note_layouts.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(ROOT))

from ruvllm_lab import Config  # noqa: E402
from ruvllm_lab.context import ContextBuilder, provenance  # noqa: E402
from ruvllm_lab.experiments.memory_ablation import correct_any  # noqa: E402
from ruvllm_lab.experiments.results import t_interval  # noqa: E402
from ruvllm_lab.inference import InferencePool  # noqa: E402
from ruvllm_lab.relevance import MEMORY_EVAL_PATH, load_memory_eval  # noqa: E402
from ruvllm_lab.types import Source  # noqa: E402

LAYOUTS = {  # name -> [prompt] overrides; None = no note at all
    "no note": None,
    "answer only": {"prompt.answer_note": "- {provenance} (to this question): {answer}",
                    "prompt.question_with_notes": "Question: {query}"},
    "question + answer (default)": {"prompt.answer_note": "- {provenance}: Q: {question} A: {answer}",
                          "prompt.question_with_notes": "Question: {query}"},
    "question + answer, ends in Answer:": {"prompt.answer_note": "- {provenance}: Q: {question} A: {answer}",
                                           "prompt.question_with_notes": "Question: {query}\nAnswer:"},
}


def run(config: Config, tiers: list[str], max_tokens: int) -> dict:
    rows = load_memory_eval(MEMORY_EVAL_PATH, "calib")
    large = config.inference.models[-1]
    config = config.with_overrides({"inference.max_loaded_models": len(tiers) + 1, "inference.prefix_reuse": False})
    pool = InferencePool(config.inference, config.system)
    note_provenance = provenance("interaction", {"verification": "gold"})
    results: dict[tuple[str, str], list[bool]] = {(tier, name): [] for tier in tiers for name in LAYOUTS}
    try:
        def ask(tier: str, messages: list[dict]) -> str:
            return pool.generate(tier, messages, max_tokens=max_tokens, temperature=0.0).text

        system = [{"role": "system", "content": config.prompt.system_prompt}]
        verified = []
        for row in rows:
            answer = ask(large, system + [{"role": "user", "content": row["question"]}]).strip()
            if correct_any(row, answer):
                verified.append((row, answer))
        for (tier, name), hits in results.items():
            overrides = LAYOUTS[name]
            prompt = config.with_overrides(overrides or {}).prompt
            builder = ContextBuilder(config.retrieval, prompt, memory=None, attention=None, count_tokens=len,
                                     dimension=config.embedding.dimension)
            for row, answer in verified:
                note = Source(0, f"Q: {row['question']}\nA: {answer}", 1.0, provenance=note_provenance)
                for question in [row["question"], *row["paraphrases"]]:
                    messages = builder.messages(question, [] if overrides is None else [note], session=None)
                    hits.append(correct_any(row, ask(tier, messages)))
    finally:
        pool.close()
    table = []
    for (tier, name), hits in results.items():
        _, m, lo, hi = t_interval(hits)
        table.append({"tier": tier, "layout": name, "correct": int(sum(hits)), "n": len(hits), "accuracy": m,
                      "ci_low": lo, "ci_high": hi})
    return {"tiers": tiers, "note_tier": large, "calib_questions": len(rows), "verified_notes": len(verified),
            "max_tokens": max_tokens, "layouts": table}


def markdown(report: dict) -> str:
    lines = [f"# Note layouts (notes from {report['note_tier']})", "",
             f"Calib split: {report['calib_questions']} questions, {report['verified_notes']} answered right by "
             f"{report['note_tier']} (those are the notes); each asked as itself and as 2 paraphrases, greedy, "
             f"<= {report['max_tokens']} tokens, strict matcher.  95 % t-interval over questions, clipped to [0, 1] (they are not "
             "independent: 3 phrasings of one fact).  Command: `python experiments/note_layouts.py`.", "",
             "| answering tier | layout | correct / n | accuracy [95 % CI] |", "|---|---|---|---|"]
    for r in report["layouts"]:
        lines.append(f"| {r['tier']} | {r['layout']} | {r['correct']} / {r['n']} | {r['accuracy']:.3f} "
                     f"[{max(0.0, r['ci_low']):.3f}, {min(1.0, r['ci_high']):.3f}] |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "server-cpu.toml"))
    ap.add_argument("--tiers", nargs="+", help="answering tiers (default: the profile's two smallest)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    args = ap.parse_args(argv)
    config = Config.load(args.config)
    report = run(config, args.tiers or config.inference.models[:2], args.max_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "note_layouts.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (args.out / "note_layouts.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
