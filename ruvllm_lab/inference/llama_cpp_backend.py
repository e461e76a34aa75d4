"""llama.cpp backend (llama-cpp-python): the CPU default.

Generation is driven token by token (`Llama.eval` + our own sampler on the last
logits) rather than through `create_completion`, because that gives exact control of
deadlines, stop sequences, per-token log-probabilities and prefix reuse.

Session prefix cache: the context's KV cache belongs to at most one "live" session.
A request for the live session reuses the longest common token prefix in place.  When
another request takes the context, the live session's KV cells are copied out
(`llama_state_seq_get_data`, only the used cells, no logits) into an LRU of at most
`inference.kv_cache_sessions` states, and copied back in when that session returns.
Requests without a session always start cold, so their `prompt_tokens_evaluated`
equals `prompt_tokens`.
"""
from __future__ import annotations

import ctypes
import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..config import InferenceConfig
from ..errors import ModelLoadError
from ..models import TierSpec, read_gguf_header
from .base import (Backend, Generation, GenerationLoop, GenerationRequest, TextAssembler, common_prefix_len,
                   decode_rate, fit_prompt, sample_token, token_logprob)
from .prompts import ChatTemplate, build_prompt


def resolve_threads(n_threads: int) -> int:
    return n_threads if n_threads > 0 else (os.cpu_count() or 1)


def check_gguf_file(tier: str, path: Path, expected_size: int | None = None) -> None:
    """Fail early, with a clear message, on a missing, truncated or corrupt GGUF file."""
    if not path.exists():
        raise ModelLoadError(f"tier {tier!r}: model file {path} does not exist")
    size = path.stat().st_size
    if expected_size and size != expected_size:
        raise ModelLoadError(f"tier {tier!r}: {path} is {size} bytes, expected {expected_size} "
                             f"(truncated or corrupt); delete it and run `ruvllm models --assemble`")
    try:
        header = read_gguf_header(path)
    except ModelLoadError as e:
        raise ModelLoadError(f"tier {tier!r}: {e}") from e
    if not header.get("architecture"):
        raise ModelLoadError(f"tier {tier!r}: {path} has no general.architecture in its GGUF header")


class LlamaCppBackend(Backend):
    """One GGUF model in one llama.cpp context of `inference.max_context` tokens."""

    def __init__(self, tier: str, path: str | os.PathLike, spec: TierSpec, config: InferenceConfig, seed: int = 0):
        from llama_cpp import Llama

        self.tier, self.path, self.spec, self.config = tier, Path(path), spec, config
        expected = spec.size_bytes if not spec.path_override else None
        check_gguf_file(tier, self.path, expected)
        self.n_threads = resolve_threads(config.n_threads)
        self.n_ctx = config.max_context
        try:
            self.llm = Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_batch=min(512, self.n_ctx),
                             n_threads=self.n_threads, n_threads_batch=self.n_threads, logits_all=False,
                             seed=seed, verbose=False)
        except (ValueError, RuntimeError, OSError) as e:
            raise ModelLoadError(f"tier {tier!r}: llama.cpp could not load {self.path} ({e}); "
                                 f"the file is probably truncated or corrupt") from e
        self._vocab = self.llm._model.vocab
        self._ctx = self.llm._ctx.ctx
        self._n_vocab = self.llm.n_vocab()
        self._add_bos = bool(self.llm._model.add_bos_token())
        self._bos = self.llm.token_bos()
        self._pieces: dict[int, bytes] = {}
        self._rng = np.random.default_rng(seed)
        self.template = self._chat_template()
        self._live_session: str | None = None
        self._states: OrderedDict[str, tuple[list[int], bytes]] = OrderedDict()
        self._embedder = None

    # ---- helpers ----------------------------------------------------------------------
    def _chat_template(self) -> ChatTemplate | None:
        source = self.llm.metadata.get("tokenizer.chat_template")
        if self.spec.prompt_format != "chat" or not source:
            return None
        model = self.llm._model
        bos = model.token_get_text(self._bos) if self._bos >= 0 else ""
        eos_id = self.llm.token_eos()
        eos = model.token_get_text(eos_id) if eos_id >= 0 else ""
        return ChatTemplate(source, bos_token=bos, eos_token=eos)

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            import llama_cpp
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
            if n < 0:  # buffer too small: -n is the size needed
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def _is_eog(self, token: int) -> bool:
        import llama_cpp
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def _last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self._n_vocab,))

    def tokenize_prompt(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=self._add_bos, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    # ---- session prefix cache -----------------------------------------------------------
    def _stash_live(self) -> None:
        """Copy the live session's KV cells out of the context into the LRU."""
        import llama_cpp
        sid, self._live_session = self._live_session, None
        if sid is None or self.config.kv_cache_sessions == 0 or self.llm.n_tokens == 0:
            return
        size = llama_cpp.llama_state_seq_get_size(self._ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, 0)
        self._states[sid] = (self.llm.input_ids[:self.llm.n_tokens].tolist(), bytes(buf[:n]))
        self._states.move_to_end(sid)
        while len(self._states) > self.config.kv_cache_sessions:
            self._states.popitem(last=False)

    def _restore(self, session_id: str) -> list[int]:
        """Load a stashed session into the (cleared) context; returns its tokens ([] on failure)."""
        import llama_cpp
        tokens, blob = self._states.pop(session_id)
        self.llm._ctx.kv_cache_clear()
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        if llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(blob), 0) == 0:
            self.llm._ctx.kv_cache_clear()
            return []
        self.llm.input_ids[:len(tokens)] = tokens
        self.llm.n_tokens = len(tokens)
        return tokens

    def _prepare_context(self, tokens: list[int], session_id: str | None) -> int:
        """Position the context for `tokens`; returns how many leading tokens are already evaluated."""
        use_cache = session_id is not None and self.config.kv_cache_sessions > 0
        if use_cache and session_id == self._live_session:
            reuse = common_prefix_len(self.llm.input_ids[:self.llm.n_tokens].tolist(), tokens)
        else:
            self._stash_live()
            reuse = 0
            if use_cache and session_id in self._states:
                reuse = common_prefix_len(self._restore(session_id), tokens)
        reuse = max(0, min(reuse, len(tokens) - 1))  # evaluate at least one token to get fresh logits
        if reuse and not self.llm._ctx.kv_cache_seq_rm(-1, reuse, -1):
            # some caches (recurrent, windowed) cannot drop a suffix: start cold instead
            self.llm._ctx.kv_cache_clear()
            reuse = 0
        self.llm.n_tokens = reuse  # Llama.eval drops KV cells from here on
        self._live_session = session_id if use_cache else None
        return reuse

    # ---- generation -----------------------------------------------------------------------
    def run(self, request: GenerationRequest) -> GenerationLoop:
        prompt_text, format_stop = build_prompt(request.messages, self.spec.prompt_format, self.template)
        tokens = self.tokenize_prompt(prompt_text)
        tokens, truncated = fit_prompt(tokens, self.n_ctx, request.max_tokens, self.config.on_context_overflow,
                                       keep_first=self._add_bos)
        max_new = min(request.max_tokens, self.n_ctx - len(tokens))
        assembler = TextAssembler(list(request.stop) + format_stop)
        completion: list[int] = []
        logprobs: list[float] | None = [] if request.logprobs else None
        t_first = t_last = None
        finish = "length"
        evaluated = 0

        if request.deadline_passed():
            finish = "deadline"
        else:  # for/else: decode only when the whole prompt was evaluated
            reuse = self._prepare_context(tokens, request.session_id)
            n_batch = self.llm.n_batch
            for start in range(reuse, len(tokens), n_batch):
                if request.deadline_passed():
                    finish = "deadline"
                    break
                chunk = tokens[start:start + n_batch]
                self.llm.eval(chunk)
                evaluated += len(chunk)
            else:
                for step in range(max_new):
                    logits = self._last_logits()
                    token = sample_token(logits, request.temperature, request.top_p, self._rng)
                    t_last = time.perf_counter()
                    t_first = t_first or t_last
                    if self._is_eog(token):
                        finish = "stop"
                        break
                    completion.append(token)
                    if logprobs is not None:
                        logprobs.append(token_logprob(logits, token))
                    text = assembler.feed(self._piece(token))
                    if text:
                        yield text
                    if assembler.stopped:
                        finish = "stop"
                        break
                    if request.deadline_passed():
                        finish = "deadline"
                        break
                    if step + 1 < max_new:
                        self.llm.eval([token])
        tail = assembler.finish()
        if tail:
            yield tail
        end = time.perf_counter()
        return Generation(
            text=assembler.text, tier=self.tier, prompt_tokens=len(tokens), completion_tokens=len(completion),
            prompt_tokens_evaluated=evaluated, latency_ms=(end - request.started_at) * 1e3,
            ttft_ms=((t_first or end) - request.started_at) * 1e3,
            tokens_per_s=decode_rate(len(completion), t_first, t_last), finish_reason=finish,
            logprobs=logprobs, truncated=truncated)

    # ---- embeddings -------------------------------------------------------------------------
    def embed(self, texts: list[str]) -> np.ndarray:
        """Mean-pooled final hidden states from a second, embedding-mode context on the same file.

        The weights are mmap-ed, so the second model shares their pages with the first.
        """
        if not texts:
            return np.zeros((0, self.llm.n_embd()), dtype=np.float32)
        if self._embedder is None:
            import llama_cpp
            try:
                self._embedder = llama_cpp.Llama(
                    model_path=str(self.path), n_ctx=self.n_ctx, n_batch=self.n_ctx, n_ubatch=self.n_ctx,
                    n_threads=self.n_threads, n_threads_batch=self.n_threads, embedding=True,
                    pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False)
            except (ValueError, RuntimeError) as e:
                raise ModelLoadError(f"tier {self.tier!r}: cannot open an embedding context ({e})") from e
        rows = [self._embedder.embed(t, normalize=False, truncate=True) for t in texts]
        return np.asarray(rows, dtype=np.float32)

    def close(self) -> None:
        self._states.clear()
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None


class VocabTokenCounter:
    """Counts tokens with a vocabulary-only llama.cpp model (no weights, no context)."""

    def __init__(self, tier: str, path: str | os.PathLike):
        import llama_cpp
        from llama_cpp._internals import LlamaModel

        check_gguf_file(tier, Path(path))
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        try:
            self._model = LlamaModel(path_model=str(path), params=params, verbose=False)
        except ValueError as e:
            raise ModelLoadError(f"tier {tier!r}: cannot read the vocabulary of {path} ({e})") from e

    def count(self, text: str) -> int:
        if not text:
            return 0
        return len(self._model.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def close(self) -> None:
        self._model.close()
