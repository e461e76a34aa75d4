"""How well do the cheap quality signals agree with gold? The judge's calibration table.

    python experiments/judge_calibration.py [--n 40] [--answer-tier smollm2-135m]
                                            [--judge-tier smollm2-135m --judge-tier qwen2.5-coder-0.5b]

The answering tier answers ``--n`` generated workload questions (exact gold answers) through the
transformers backend, which returns per-token log-probabilities; each judge tier then grades every
answer with the LLM-as-judge rubric (llama.cpp, greedy, no reference answer shown). Signals:
``logprob`` = geometric-mean token probability of the answer, ``llm:<tier>`` = the judge's 1-5
grade mapped to [0, 1]; both are compared with gold correctness by
``ruvllm_lab.learning.judge.calibration_table``. Writes experiments/results/judge_calibration.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ruvllm_lab import workloads  # noqa: E402
from ruvllm_lab.config import InferenceConfig  # noqa: E402
from ruvllm_lab.experiments.routing import SYSTEM_PROMPT, judge_correct  # noqa: E402
from ruvllm_lab.inference import InferencePool  # noqa: E402
from ruvllm_lab.learning.judge import LLMJudge, calibration_markdown, calibration_table, logprob_confidence  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--answer-tier", default="smollm2-135m")
    p.add_argument("--judge-tier", action="append")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    args = p.parse_args(argv)
    judges = args.judge_tier or ["smollm2-135m", "qwen2.5-coder-0.5b"]
    items = workloads.generate(n=args.n, seed=args.seed)

    t0 = time.perf_counter()
    answerer = InferencePool(InferenceConfig(models=[args.answer_tier], backend="transformers", max_context=512))
    rows = []
    try:
        for item in items:
            g = answerer.generate(args.answer_tier, [{"role": "system", "content": SYSTEM_PROMPT},
                                                     {"role": "user", "content": item.query}],
                                  max_tokens=24, temperature=0.0, logprobs=True)
            rows.append({"query": item.query, "answer": g.text, "gold_answer": item.answer,
                         "gold": float(judge_correct(item, g.text)),
                         "logprob": logprob_confidence(g.logprobs).geometric_mean_prob if g.logprobs else None})
    finally:
        answerer.close()

    graders = InferencePool(InferenceConfig(models=judges, max_loaded_models=len(judges)))
    try:
        for tier in judges:
            judge = LLMJudge(graders, tier)
            for row in rows:
                row[f"llm:{tier}"], row[f"reply:{tier}"] = judge.judge(row["query"], row["answer"])
    finally:
        graders.close()

    table = calibration_table(rows, signals=["logprob", *(f"llm:{t}" for t in judges)])
    command = "python experiments/judge_calibration.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = (f"# Judge calibration ({time.strftime('%Y-%m-%d')})\n\n{len(rows)} generated questions answered by "
          f"`{args.answer_tier}` (transformers, greedy); judged by {', '.join(f'`{t}`' for t in judges)} "
          f"(llama.cpp, greedy, no reference shown). Command: `{command}`; {time.perf_counter() - t0:.0f} s.\n\n"
          + calibration_markdown(table) + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "judge_calibration.md").write_text(md)
    (out / "judge_calibration.json").write_text(json.dumps({"table": table, "rows": rows}, indent=2, default=str))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
