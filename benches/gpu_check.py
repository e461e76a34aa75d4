"""The transformers backend on CUDA with the server-gpu profile: correctness first, then speed.

    python benches/gpu_check.py                       # the profile's own tiers
    python benches/gpu_check.py --model PATH.gguf     # another GGUF (e.g. the 135M tier on a
                                                      # machine without the model packages)

Needs a CUDA machine; exits 2 when none is visible. Checks, each reported pass/fail:
the backend really runs on CUDA (`use_vllm = true` without vLLM falls back to transformers);
greedy "capital of France" contains Paris; streamed chunks concatenate to the non-streamed
text; log-probabilities come with every token; a session's second turn evaluates fewer prompt
tokens than cold; mean-pooled hidden-state embeddings are finite and distinct. Then decode speed.
Writes `benches/results/gpu.json` and `.md` (or `--out DIR`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ruvllm_lab.config import Config  # noqa: E402
from ruvllm_lab.inference import InferencePool  # noqa: E402

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def run_checks(pool: InferencePool, tier: str) -> tuple[list[dict], dict]:
    checks = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)

    t0 = time.perf_counter()
    g = pool.generate(tier, FRANCE, temperature=0.0, max_tokens=16, logprobs=True)
    load_s = time.perf_counter() - t0
    backend = pool._resident[tier]  # the resident backend object, to report where it runs
    device = getattr(backend, "device", "?")
    check("backend on cuda", device == "cuda", f"{type(backend).__name__} on {device}, "
          f"dtype {getattr(getattr(backend, 'model', None), 'dtype', '?')}, first call {load_s:.1f} s (load + convert)")
    check("greedy answer", "Paris" in g.text, repr(g.text))
    check("logprobs", g.logprobs is not None and len(g.logprobs) == g.completion_tokens
          and all(lp <= 0 for lp in g.logprobs), f"{len(g.logprobs or [])} for {g.completion_tokens} tokens")
    streamed = "".join(pool.stream(tier, FRANCE, temperature=0.0, max_tokens=16))
    check("stream == generate", streamed == g.text, repr(streamed))

    turn1 = [{"role": "user", "content": "Name a fruit."}]
    first = pool.generate(tier, turn1, temperature=0.0, max_tokens=8, session_id="s")
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And a vegetable?"}]
    warm = pool.generate(tier, turn2, temperature=0.0, max_tokens=8, session_id="s")
    cold = pool.generate(tier, turn2, temperature=0.0, max_tokens=8)
    check("session prefix reuse", 0 < warm.prompt_tokens_evaluated < cold.prompt_tokens_evaluated,
          f"turn 2 evaluated {warm.prompt_tokens_evaluated} warm vs {cold.prompt_tokens_evaluated} cold")

    vecs = pool.embed(tier, ["The cat sat on the mat.", "Quarterly revenue grew by 4%."])
    check("embed", np.isfinite(vecs).all() and not np.allclose(vecs[0], vecs[1], atol=1e-2),
          f"shape {tuple(vecs.shape)}, cosine {float(vecs[0] @ vecs[1] / np.linalg.norm(vecs[0]) / np.linalg.norm(vecs[1])):.3f}")

    story = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    runs = [pool.generate(tier, story, temperature=0.0, max_tokens=128) for _ in range(3)]
    speed = {"decode_tok_s": float(np.median([r.tokens_per_s for r in runs])),
             "ttft_ms": float(np.median([r.ttft_ms for r in runs])),
             "completion_tokens": int(runs[0].completion_tokens)}
    print(f"decode {speed['decode_tok_s']:.1f} tok/s, TTFT {speed['ttft_ms']:.1f} ms", flush=True)
    return checks, speed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "server-gpu.toml"))
    p.add_argument("--model", action="append", help="tier or GGUF path (repeatable; default: the profile's)")
    p.add_argument("--out", default=str(ROOT / "benches" / "results"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch
    if not torch.cuda.is_available():
        print("no CUDA device visible: this check runs on a GPU machine only")
        return 2
    overrides = {"inference.models": args.model} if args.model else {}
    cfg = Config.load(args.config, overrides=overrides)
    pool = InferencePool(cfg.inference, cfg.system)
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "gpu": torch.cuda.get_device_name(0),
               "torch": torch.__version__, "python": platform.python_version(),
               "config": Path(args.config).name, "command": "python benches/gpu_check.py " + " ".join(argv or sys.argv[1:]),
               "tiers": {}}
    try:
        for tier in cfg.inference.models:
            checks, speed = run_checks(pool, tier)
            results["tiers"][Path(tier).name] = {"checks": checks, **speed}
    finally:
        pool.close()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=2))
    lines = [f"# transformers backend on CUDA ({results['date']})", "",
             f"{results['gpu']}, torch {results['torch']}, profile `{results['config']}`; "
             f"command: `{results['command']}`", "", "| tier | check | result | detail |", "|---|---|---|---|"]
    for tier, r in results["tiers"].items():
        lines += [f"| {tier} | {c['check']} | {'pass' if c['ok'] else 'FAIL'} | {c['detail']} |" for c in r["checks"]]
        lines.append(f"| {tier} | decode speed | | {r['decode_tok_s']:.1f} tok/s, TTFT {r['ttft_ms']:.1f} ms |")
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(c["ok"] for r in results["tiers"].values() for c in r["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
