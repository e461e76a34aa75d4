"""vLLM backend (optional extra, GPU hosts only): `inference.use_vllm = true`.

Serves a tier through vLLM's offline `LLM` API.  vLLM needs a CUDA GPU, so it cannot
run on the CPU machines this lab is developed on; when the package is not importable
the pool falls back to the transformers backend with one warning.  This module is not
exercised by the test-suite (and is omitted from coverage) for that reason.

Limits compared with the other backends: vLLM runs a whole request at once, so
`stream` yields one chunk, a deadline becomes a token cap estimated from nothing
(it is checked only before the call), and there is no session prefix reuse beyond
vLLM's own automatic prefix caching.
"""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import numpy as np

from ..config import InferenceConfig
from ..errors import ModelLoadError
from ..models import TierSpec
from .base import Backend, Generation, GenerationLoop, GenerationRequest, TextAssembler
from .prompts import ChatTemplate, build_prompt


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VLLMBackend(Backend):
    def __init__(self, tier: str, path: str | os.PathLike, spec: TierSpec, config: InferenceConfig, seed: int = 0):
        from vllm import LLM

        from .transformers_backend import convert_gguf, hf_cache_dir

        self.tier, self.spec, self.config, self.n_ctx = tier, spec, config, config.max_context
        # vLLM reads GGUF weights but wants an HF tokenizer next to them: use the converted checkpoint
        checkpoint = convert_gguf(tier, Path(path), hf_cache_dir(tier))
        try:
            self.llm = LLM(model=str(checkpoint), max_model_len=self.n_ctx, seed=seed,
                           tensor_parallel_size=config.tensor_parallel, enable_prefix_caching=True)
        except Exception as e:
            raise ModelLoadError(f"tier {tier!r}: vLLM could not load {checkpoint} ({e})") from e
        self.tokenizer = self.llm.get_tokenizer()
        source = getattr(self.tokenizer, "chat_template", None)
        self.template = ChatTemplate(source, self.tokenizer.bos_token or "", self.tokenizer.eos_token or "") \
            if source and spec.prompt_format == "chat" else None

    def run(self, request: GenerationRequest) -> GenerationLoop:
        from vllm import SamplingParams

        prompt_text, format_stop = build_prompt(request.messages, self.spec.prompt_format, self.template)
        n_prompt = len(self.tokenizer.encode(prompt_text))
        text, n_out, finish, logprobs = "", 0, "deadline", None
        if not request.deadline_passed():
            params = SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature,
                                    top_p=request.top_p, stop=list(request.stop) + format_stop,
                                    logprobs=0 if request.logprobs else None)
            out = self.llm.generate([prompt_text], params, use_tqdm=False)[0].outputs[0]
            assembler = TextAssembler([])
            assembler.feed(out.text.encode("utf-8"))
            assembler.finish()
            text, n_out = assembler.text, len(out.token_ids)
            finish = "length" if out.finish_reason == "length" else "stop"
            if request.logprobs and out.logprobs:
                logprobs = [float(step[tid].logprob) for step, tid in zip(out.logprobs, out.token_ids)]
        if text:
            yield text
        elapsed = (time.perf_counter() - request.started_at) * 1e3
        return Generation(text=text, tier=self.tier, prompt_tokens=n_prompt, completion_tokens=n_out,
                          prompt_tokens_evaluated=n_prompt, latency_ms=elapsed, ttft_ms=elapsed,
                          tokens_per_s=n_out / (elapsed / 1e3) if elapsed > 0 else 0.0, finish_reason=finish,
                          logprobs=logprobs, truncated=False)

    def embed(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError("embeddings are served by the transformers or llama.cpp backend, not vLLM")

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def close(self) -> None:
        self.llm = None
