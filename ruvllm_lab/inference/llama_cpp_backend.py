"""llama.cpp backend (llama-cpp-python): the CPU default, with continuous batching.

One context holds `inference.max_batch_sequences` sequences, each with its own KV stream of
`inference.max_context` cells (`kv_unified=False`: attention of one sequence never scans
another's cells).  A scheduler thread owns the context.  Each step it builds one
`llama_batch`: the next token of every sequence that is decoding, then prompt chunks of
sequences still prefilling, up to `inference.batch_tokens` tokens; one `llama_decode` runs
them all.  A request that arrives joins at the next step; one that ends (stop, length,
deadline, cancel, error) leaves at once and its slot serves the next waiting request.  The
per-request logic is the shared `TokenDecoder` (base.py); this module only feeds tokens and
reads logits.

Prefix reuse.  A slot keeps the KV of its last prompt after the request leaves (the answer's
cells are dropped, except for a session, whose next turn contains the answer).  A new request
takes the free slot sharing the longest token prefix with its prompt and evaluates only the
rest, so the system prompt is computed once per slot, not per request.  A session prefers
the slot it used before; when that slot is taken by someone else its cells are copied out
(`llama_state_seq_get_data`, only that sequence's cells) into an LRU of at most
`inference.kv_cache_sessions` states and copied back when the session returns.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import InferenceConfig
from ..errors import ModelLoadError, RuvLLMError
from ..models import TierSpec, read_gguf_header
from .base import (GenerationLoop, GenerationRequest, ScheduledBackend, ScheduledJob, TokenDecoder,
                   common_prefix_len, fit_prompt)
from .prompts import ChatTemplate, build_prompt

log = logging.getLogger(__name__)

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


@dataclass(eq=False)
class _Job(ScheduledJob):
    """One request inside the scheduler, and the sequence (slot) it decodes in."""
    slot: "_Slot | None" = None
    fed: int = 0  # prompt tokens in the slot's KV so far


@dataclass(eq=False)
class _Slot:
    """One llama.cpp sequence: `tokens` are exactly the tokens whose KV cells it holds."""
    seq_id: int
    tokens: list[int] = field(default_factory=list)
    session: str | None = None
    job: _Job | None = None
    last_used: float = 0.0


class LlamaCppBackend(ScheduledBackend):
    """One GGUF model in one llama.cpp context of `max_batch_sequences` sequences x `max_context` tokens."""

    def __init__(self, tier: str, path: str | os.PathLike, spec: TierSpec, config: InferenceConfig, seed: int = 0):
        import llama_cpp
        from llama_cpp._internals import LlamaContext, LlamaModel
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp's debug log goes through a Python callback per line: slow and noisy
        self.tier, self.path, self.spec, self.config = tier, Path(path), spec, config
        expected = spec.size_bytes if not spec.path_override else None
        check_gguf_file(tier, self.path, expected)
        self.n_threads = resolve_threads(config.n_threads)
        self.n_ctx = config.max_context
        self.n_seq = config.max_batch_sequences
        self.n_batch = max(config.batch_tokens, self.n_seq)  # every decoding sequence fits in one step
        llama_cpp.llama_backend_init()
        try:
            self.model = LlamaModel(path_model=str(self.path), params=llama_cpp.llama_model_default_params(),
                                    verbose=False)
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = self.n_ctx * self.n_seq
            params.n_batch = params.n_ubatch = self.n_batch
            params.n_seq_max = self.n_seq
            params.kv_unified = False
            params.n_threads = params.n_threads_batch = self.n_threads
            params.embeddings = False
            self._context = LlamaContext(model=self.model, params=params, verbose=False)
        except (ValueError, RuntimeError, OSError) as e:
            raise ModelLoadError(f"tier {tier!r}: llama.cpp could not load {self.path} ({e}); "
                                 f"the file is probably truncated or corrupt") from e
        self._ctx = self._context.ctx
        self._mem = self._context.memory
        self._vocab = llama_cpp.llama_model_get_vocab(self.model.model)
        self._n_vocab = self.model.n_vocab()
        self._add_bos = bool(self.model.add_bos_token())
        self._bos = self.model.token_bos()
        self._pieces: dict[int, bytes] = {}
        self._rng = np.random.default_rng(seed)
        self.template = self._chat_template()
        self._states: OrderedDict[str, tuple[list[int], bytes]] = OrderedDict()  # stashed sessions, LRU
        self._embedder = None
        self._embed_lock = threading.Lock()
        # the batch: one sequence id per token
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        n = self.n_batch
        self._b_token = np.ctypeslib.as_array(self._batch.token, shape=(n,))
        self._b_pos = np.ctypeslib.as_array(self._batch.pos, shape=(n,))
        self._b_nseq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(n,))
        self._b_logits = np.ctypeslib.as_array(self._batch.logits, shape=(n,))
        self._b_nseq[:] = 1
        # scheduler
        self._slots = [_Slot(i) for i in range(self.n_seq)]
        self._pending: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.steps = self.step_tokens = self.step_sequences = self.peak_sequences = 0  # batch_stats()
        self._worker = threading.Thread(target=self._serve, name=f"llama-batch-{tier}", daemon=True)
        self._worker.start()

    # ---- helpers ----------------------------------------------------------------------
    def _chat_template(self) -> ChatTemplate | None:
        source = self.model.metadata().get("tokenizer.chat_template")
        if self.spec.prompt_format != "chat" or not source:
            return None
        bos = self.model.token_get_text(self._bos) if self._bos >= 0 else ""
        eos_id = self.model.token_eos()
        eos = self.model.token_get_text(eos_id) if eos_id >= 0 else ""
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

    def tokenize_prompt(self, text: str) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=self._add_bos, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenize(text.encode("utf-8"), add_bos=False, special=False)) if text else 0

    def busy_sequences(self) -> int:
        """Sequences serving a request right now, plus requests waiting for one."""
        with self._cond:
            return sum(s.job is not None for s in self._slots) + len(self._pending)

    def batch_stats(self) -> dict:
        """Decode steps so far, the tokens and sequences they carried, and the most sequences in one step."""
        steps = max(self.steps, 1)
        return {"steps": self.steps, "mean_tokens": self.step_tokens / steps,
                "mean_sequences": self.step_sequences / steps, "peak_sequences": self.peak_sequences}

    # ---- generation (caller's thread) ---------------------------------------------------------
    def run(self, request: GenerationRequest) -> GenerationLoop:
        prompt_text, format_stop = build_prompt(request.messages, self.spec.prompt_format, self.template)
        tokens, truncated = fit_prompt(self.tokenize_prompt(prompt_text), self.n_ctx, request.max_tokens,
                                       self.config.on_context_overflow, keep_first=self._add_bos)
        decoder = TokenDecoder(request, len(tokens), min(request.max_tokens, self.n_ctx - len(tokens)),
                               list(request.stop) + format_stop, self._is_eog,
                               lambda completion: self._piece(completion[-1]), self._rng, self.tier, truncated)
        session = request.session_id if self.config.kv_cache_sessions > 0 else None
        job = _Job(decoder, tokens, session)
        return (yield from self._relay(job))

    # ---- scheduler (worker thread; the only thread that touches the context) ------------------
    def _active_jobs(self) -> list[_Job]:
        return [s.job for s in self._slots if s.job is not None]

    def _admit(self, job: _Job) -> None:
        self._place(job)

    def _choose_slot(self, job: _Job) -> _Slot:
        free = [s for s in self._slots if s.job is None]
        if job.session is not None:
            mine = next((s for s in free if s.session == job.session), None)
            if mine is not None:
                return mine
        # keep other sessions warm when possible, then the longest shared prefix, then least recently used
        return max(free, key=lambda s: (s.session is None, common_prefix_len(s.tokens, job.prompt), -s.last_used))

    def _place(self, job: _Job) -> None:
        """Give `job` a sequence, reusing the longest cached prefix of its prompt."""
        import llama_cpp
        slot = self._choose_slot(job)
        if slot.session is not None and slot.session != job.session:
            self._stash(slot)
        if job.session is not None and slot.session != job.session and job.session in self._states:
            self._restore(slot, job.session)
        reuse = min(common_prefix_len(slot.tokens, job.prompt), len(job.prompt) - 1)  # >= 1 token for logits
        if not self.config.prefix_reuse:
            reuse = 0
        if reuse <= 0 or not llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, reuse, -1):
            # nothing shared, or a cache (recurrent, windowed) that cannot drop a suffix: start cold
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            reuse = 0
        slot.tokens = job.prompt[:reuse]
        slot.session = job.session
        slot.job, job.slot, job.fed = job, slot, reuse

    def _stash(self, slot: _Slot) -> None:
        """Copy a warm session's cells out of its sequence into the LRU."""
        import llama_cpp
        sid, slot.session = slot.session, None
        if not slot.tokens:
            return
        size = llama_cpp.llama_state_seq_get_size(self._ctx, slot.seq_id)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, slot.seq_id)
        self._states[sid] = (list(slot.tokens), bytes(buf[:n]))
        self._states.move_to_end(sid)
        while len(self._states) > self.config.kv_cache_sessions:
            self._states.popitem(last=False)

    def _restore(self, slot: _Slot, session: str) -> None:
        import llama_cpp
        tokens, blob = self._states.pop(session)
        llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        if llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(blob), slot.seq_id) == 0:
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            tokens = []
        slot.tokens = tokens

    def _end(self, job: _Job, error: BaseException | None = None) -> None:
        """Finish `job` and free its sequence; the slot keeps the prompt's cells for prefix reuse."""
        import llama_cpp
        slot, job.slot = job.slot, None
        if slot is not None:
            slot.job, slot.last_used = None, time.perf_counter()
            if error is not None:
                keep, slot.session = 0, None  # the cells may be half-written: drop them all
            elif slot.session is not None:
                keep = len(slot.tokens)  # the next turn contains this answer
            else:
                keep = min(len(slot.tokens), len(job.prompt))  # the answer's cells are freed
            if keep < len(slot.tokens):
                if not llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, keep, -1):
                    llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
                    keep = 0
                slot.tokens = slot.tokens[:keep]
        if error is not None:
            job.decoder.finish("cancelled")
            job.events.put(("error", error))
            return
        self._finish(job, "cancelled" if job.abandoned else None)

    def _step(self) -> None:
        """One llama_decode over every sequence that has work."""
        import llama_cpp
        jobs = [s.job for s in self._slots if s.job is not None]
        for job in jobs:
            if job.abandoned or job.decoder.interrupt():
                self._end(job)
        jobs = [j for j in jobs if j.slot is not None]
        n, outputs = 0, []
        seq_ids = self._batch.seq_id
        # decoding sequences first (one token each), so a long prompt never stalls their answers
        for job in jobs:
            token = job.decoder.next_token
            if token is not None and job.fed == len(job.prompt):
                self._b_token[n], self._b_pos[n], self._b_logits[n] = token, len(job.slot.tokens), 1
                seq_ids[n][0] = job.slot.seq_id
                outputs.append((n, job, [token]))
                n += 1
        for job in sorted((j for j in jobs if j.fed < len(j.prompt)), key=lambda j: j.decoder.request.started_at):
            take = min(len(job.prompt) - job.fed, self.n_batch - n)
            if take <= 0:
                break
            chunk = job.prompt[job.fed:job.fed + take]
            sl = slice(n, n + take)
            self._b_token[sl] = chunk
            self._b_pos[sl] = np.arange(job.fed, job.fed + take)
            self._b_logits[sl] = 0
            for i in range(n, n + take):
                seq_ids[i][0] = job.slot.seq_id
            n += take
            last = job.fed + take == len(job.prompt)
            if last:
                self._b_logits[n - 1] = 1
            outputs.append((n - 1, job, chunk) if last else (None, job, chunk))
        if n == 0:
            return
        self._batch.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuvLLMError(f"llama_decode returned {rc} for a batch of {n} tokens ({len(outputs)} sequences)")
        self.steps += 1
        self.step_tokens += n
        self.step_sequences += len(outputs)
        self.peak_sequences = max(self.peak_sequences, len(outputs))
        for index, job, fed in outputs:
            job.slot.tokens.extend(fed)
            if job.fed < len(job.prompt):
                job.fed += len(fed)
                job.decoder.evaluated += len(fed)
            if index is None:
                continue
            try:
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,))
                text = job.decoder.accept(logits)
            except Exception as e:  # this request's failure frees its sequence; the others go on
                self._end(job, error=e)
                continue
            if text:
                job.events.put(("text", text))
            if job.decoder.done:
                self._end(job)

    # ---- embeddings -------------------------------------------------------------------------
    def embed(self, texts: list[str]) -> np.ndarray:
        """Mean-pooled final hidden states from a second, embedding-mode context on the same file.

        The weights are mmap-ed, so the second model shares their pages with the first.
        """
        if not texts:
            return np.zeros((0, self.model.n_embd()), dtype=np.float32)
        with self._embed_lock:
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
        """Stop the scheduler (requests still inside get an error), then free the context and model."""
        import llama_cpp
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._worker.join()  # the context is freed only once no decode can be running
        self._states.clear()
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
            self._context.close()
            self.model.close()


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
