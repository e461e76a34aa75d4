"""`InferencePool`: the tiers of `inference.models`, loaded lazily, LRU-evicted, thread-safe.

Residency rules
    * at most `inference.max_loaded_models` models resident, and the sum of their GGUF
      file sizes within `system.max_memory_mb`;
    * to make room, the least recently used *idle* model is evicted; a model that is
      generating, or has requests queued for it, is pinned and never evicted: the
      newcomer waits instead (so two requests that need different models at the limit
      take turns rather than deadlock: each request pins at most one model at a time);
    * a batching backend (llama.cpp) takes every request at once and decodes them together
      (continuous batching, `inference.max_batch_sequences`); any other backend runs one
      generation per model at a time, behind a FIFO wait queue.

Deadlines (`max_latency_ms`) run from the moment the call enters the pool, so queue
wait and a lazy load count.  A budget spent before the model could run gives a
`Generation` with empty text and `finish_reason="deadline"`.

`count_tokens` uses a vocabulary-only tokenizer per tier, so counting never loads
weights, evicts a model, or waits behind a generation.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Iterator

import numpy as np

from .. import models
from ..config import InferenceConfig, SystemConfig
from ..errors import ModelLoadError, ModelNotFound, RuvLLMError
from .base import Backend, Generation, GenerationLoop, GenerationRequest, drain
from .prompts import normalize_messages

log = logging.getLogger(__name__)

_MB = 1024 * 1024


class FairLock:
    """A mutex whose waiters are served first come, first served; acquire can time out."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._held = False

    def acquire(self, deadline: float | None = None) -> bool:
        """Wait until it is our turn; False if `deadline` (a perf_counter value) passes first."""
        me = object()
        with self._cond:
            self._queue.append(me)
            while self._held or self._queue[0] is not me:
                remaining = None if deadline is None else deadline - time.perf_counter()
                if remaining is not None and remaining <= 0:
                    self._queue.remove(me)
                    self._cond.notify_all()
                    return False
                self._cond.wait(remaining)
            self._queue.popleft()
            self._held = True
            return True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()


class GenerationStream:
    """Iterate for text chunks; once exhausted, `.result` holds the `Generation`.

    The model stays reserved while the stream is open: exhaust it or `close()` it
    (it is also a context manager).
    """

    def __init__(self, loop: GenerationLoop):
        self._loop = loop
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return next(self._loop)
        except StopIteration as stop:
            self.result = stop.value
            raise StopIteration from None

    def close(self) -> None:
        self._loop.close()

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def text(self) -> str:
        """Drain the stream and return the final text."""
        for _ in self:
            pass
        return self.result.text


class InferencePool:
    """Serve generations from the configured tiers (smallest first), loading them on demand."""

    def __init__(self, config: InferenceConfig, system: SystemConfig | None = None):
        if hasattr(config, "inference"):  # a whole `Config` was passed: take its sections
            system = system or config.system
            config = config.inference
        self.config = config
        self.system = system or SystemConfig()
        self._cond = threading.Condition()
        self._resident: OrderedDict[str, Backend] = OrderedDict()  # LRU order: oldest first
        self._loading: dict[str, float] = {}  # tier -> MB being loaded
        self._pins: dict[str, int] = {}
        self._gen_locks: dict[str, FairLock] = {}
        self._specs: dict[str, models.TierSpec] = {}
        self._tokenizers: dict[str, object] = {}
        self._tokenizer_lock = threading.Lock()
        self._closed = False
        self._warned_vllm = False
        # Shutdown safety: threads inside a backend step right now, and the cancel flags of the
        # generations in flight; close() cancels those and frees no model while a step runs.
        self._stepping = 0
        self._active: set[threading.Event] = set()

    # ---- introspection ------------------------------------------------------------------
    @property
    def tiers(self) -> list[str]:
        return list(self.config.models)

    def loaded_models(self) -> list[str]:
        """Resident tiers, least recently used first."""
        with self._cond:
            return list(self._resident)

    def spec(self, tier: str) -> models.TierSpec:
        """The tier's spec; `ModelNotFound` (naming the known tiers) for anything unknown.

        Besides the configured tiers, any ladder tier or existing .gguf path is served.
        """
        spec = self._specs.get(tier)
        if spec is not None:
            return spec
        if not isinstance(tier, str) or not tier:
            raise ModelNotFound(f"tier must be a non-empty string, got {tier!r}; known tiers: {', '.join(self.tiers)}")
        try:
            spec = models.resolve(tier)
        except ModelNotFound:
            raise ModelNotFound(f"unknown tier {tier!r}; this pool serves {', '.join(self.tiers)} "
                                f"(the ladder also has {', '.join(models.LADDER)}, or pass a path to a .gguf file)") from None
        self._specs[tier] = spec
        return spec

    def _size_mb(self, tier: str) -> float:
        return self.spec(tier).size_bytes / _MB

    # ---- residency ----------------------------------------------------------------------
    def _room_for(self, need_mb: float) -> bool:
        count = len(self._resident) + len(self._loading)
        used = sum(self._size_mb(t) for t in self._resident) + sum(self._loading.values())
        return count < self.config.max_loaded_models and used + need_mb <= self.system.max_memory_mb

    def _acquire(self, tier: str, deadline: float | None) -> Backend | None:
        """Pin `tier`'s backend, loading it (and evicting idle models) if needed; None if the deadline passed."""
        need_mb = self._size_mb(tier)
        if need_mb > self.system.max_memory_mb:
            raise ModelLoadError(f"tier {tier!r} needs ~{need_mb:.0f} MB, more than system.max_memory_mb="
                                 f"{self.system.max_memory_mb}; raise the budget or pick a smaller tier")
        with self._cond:
            while True:
                if self._closed:
                    raise RuvLLMError("the inference pool is closed")
                if tier in self._resident:
                    self._resident.move_to_end(tier)
                    self._pins[tier] = self._pins.get(tier, 0) + 1
                    return self._resident[tier]
                if tier not in self._loading:
                    while not self._room_for(need_mb):
                        victim = next((t for t in self._resident if self._pins.get(t, 0) == 0), None)
                        if victim is None:
                            break
                        self._evict(victim)
                    if self._room_for(need_mb):
                        self._loading[tier] = need_mb
                        self._pins[tier] = self._pins.get(tier, 0) + 1
                        break
                remaining = None if deadline is None else deadline - time.perf_counter()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
        # load outside the lock: other tiers keep serving meanwhile
        try:
            backend = self._load(tier)
        except BaseException:
            with self._cond:
                del self._loading[tier]
                self._pins[tier] -= 1
                self._cond.notify_all()
            raise
        with self._cond:
            del self._loading[tier]
            self._resident[tier] = backend
            self._cond.notify_all()
        return backend

    def _release(self, tier: str) -> None:
        with self._cond:
            self._pins[tier] -= 1
            self._cond.notify_all()

    def _evict(self, tier: str) -> None:
        backend = self._resident.pop(tier)
        log.info("evicting %s", tier)
        backend.close()

    def _load(self, tier: str) -> Backend:
        spec = self.spec(tier)
        path = models.model_path(tier)
        seed = self.system.seed
        try:
            if self.config.use_vllm:
                from .vllm_backend import VLLMBackend, vllm_available
                if vllm_available():
                    return VLLMBackend(tier, path, spec, self.config, seed=seed)
                if not self._warned_vllm:
                    self._warned_vllm = True
                    log.warning("inference.use_vllm=true but the vllm package is not importable; "
                                "serving through transformers instead (pip install 'ruvllm-lab[vllm]' on a GPU host)")
                from .transformers_backend import TransformersBackend
                return TransformersBackend(tier, path, spec, self.config, seed=seed)
            if self.config.backend == "transformers":
                from .transformers_backend import TransformersBackend
                return TransformersBackend(tier, path, spec, self.config, seed=seed)
            from .llama_cpp_backend import LlamaCppBackend
            return LlamaCppBackend(tier, path, spec, self.config, seed=seed)
        except RuvLLMError:
            raise
        except Exception as e:  # anything else a loader throws is still a load failure
            raise ModelLoadError(f"tier {tier!r}: could not load {path}: {type(e).__name__}: {e}") from e

    # ---- generation -----------------------------------------------------------------------
    def _request(self, prompt, max_tokens, temperature, top_p, stop, max_latency_ms, session_id,
                 logprobs, cancel=None) -> GenerationRequest:
        started = time.perf_counter()
        cfg = self.config
        max_tokens = cfg.max_tokens if max_tokens is None else int(max_tokens)
        temperature = cfg.temperature if temperature is None else float(temperature)
        top_p = cfg.top_p if top_p is None else float(top_p)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) for s in stop)):
            raise ValueError(f"stop must be a list of strings, got {stop!r}")
        deadline = None if max_latency_ms is None else started + max(0.0, float(max_latency_ms)) / 1e3
        return GenerationRequest(messages=normalize_messages(prompt), max_tokens=max_tokens, temperature=temperature,
                                 top_p=top_p, stop=list(stop or []), deadline=deadline, session_id=session_id,
                                 logprobs=logprobs, started_at=started, cancel=cancel or threading.Event())

    def _run(self, tier: str, request: GenerationRequest) -> GenerationLoop:
        backend = self._acquire(tier, request.deadline)
        if backend is None:
            return _deadline_before_start(tier, request)
        try:
            if backend.batches:  # concurrent requests share its decode steps: no queue in front of it
                return (yield from self._cancellable(backend.run(request), request, tier))
            lock = self._gen_locks.setdefault(tier, FairLock())
            if not lock.acquire(request.deadline):
                return _deadline_before_start(tier, request)
            try:
                return (yield from self._cancellable(backend.run(request), request, tier))
            finally:
                lock.release()
        finally:
            self._release(tier)

    def _cancellable(self, loop: GenerationLoop, request: GenerationRequest, tier: str) -> GenerationLoop:
        """Drive a backend loop one chunk at a time, counting the threads inside a step (close() waits
        for them) and ending it between steps when `request.cancel` is set or the pool closes.

        Backends check `request.cancelled()` themselves at every token; this is the backstop that
        holds for any backend: a cancelled loop is closed and reported with finish_reason "cancelled".
        """
        with self._cond:
            self._active.add(request.cancel)
        try:
            while True:
                with self._cond:
                    if self._closed or request.cancelled():
                        return _cancelled(loop, request, tier)
                    self._stepping += 1
                try:
                    chunk = next(loop)
                except StopIteration as stop:
                    return stop.value
                finally:
                    with self._cond:
                        self._stepping -= 1
                        self._cond.notify_all()
                yield chunk
        finally:
            loop.close()
            with self._cond:
                self._active.discard(request.cancel)

    def generate(self, tier: str, prompt: str | list[dict], *, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, stop: list[str] | None = None,
                 max_latency_ms: float | None = None, session_id: str | None = None,
                 logprobs: bool = False, cancel: threading.Event | None = None) -> Generation:
        """Generate a reply; defaults come from `inference.*`.  Temperature 0 is greedy (deterministic).

        Setting `cancel` stops generation at the next step (finish_reason "cancelled")."""
        self.spec(tier)
        request = self._request(prompt, max_tokens, temperature, top_p, stop, max_latency_ms, session_id, logprobs,
                                cancel)
        return drain(self._run(tier, request))

    def stream(self, tier: str, prompt: str | list[dict], *, max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None, stop: list[str] | None = None,
               max_latency_ms: float | None = None, session_id: str | None = None,
               logprobs: bool = False, cancel: threading.Event | None = None) -> GenerationStream:
        """Like `generate`, yielding text chunks; chunks concatenate to `stream.result.text`."""
        self.spec(tier)
        request = self._request(prompt, max_tokens, temperature, top_p, stop, max_latency_ms, session_id, logprobs,
                                cancel)
        return GenerationStream(self._run(tier, request))

    def _with_backend(self, tier: str, fn):
        self.spec(tier)
        backend = self._acquire(tier, None)
        try:
            lock = self._gen_locks.setdefault(tier, FairLock())
            lock.acquire()
            try:
                return fn(backend)
            finally:
                lock.release()
        finally:
            self._release(tier)

    def embed(self, tier: str, texts: list[str]) -> np.ndarray:
        """(n, hidden) float32 mean-pooled final hidden states of `tier` (not normalised)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a list of strings")
        return self._with_backend(tier, lambda b: b.embed(list(texts)))

    def count_tokens(self, tier: str, text: str) -> int:
        """Tokens in `text` (plain, no template, no BOS) under `tier`'s tokenizer."""
        spec = self.spec(tier)
        with self._tokenizer_lock:
            tok = self._tokenizers.get(tier)
            if tok is None:
                tok = self._tokenizers[tier] = self._load_tokenizer(tier, spec)
        return tok.count(text)

    def _load_tokenizer(self, tier: str, spec: models.TierSpec):
        path = models.model_path(tier)
        if self.config.backend == "transformers" or self.config.use_vllm:
            from .transformers_backend import HFTokenCounter
            return HFTokenCounter(tier, path, spec)
        from .llama_cpp_backend import VocabTokenCounter
        return VocabTokenCounter(tier, path)

    # ---- health -------------------------------------------------------------------------------
    def health_check(self) -> dict:
        """Loaded models, memory, and the latency of a one-token probe on the most recent (or smallest) tier."""
        import psutil

        loaded = self.loaded_models()
        tier = loaded[-1] if loaded else self.tiers[0]
        report = {"loaded_models": loaded, "probe_tier": tier, "latency_ms": float("nan"), "healthy": False}
        try:
            g = self.generate(tier, "Hello", max_tokens=1, temperature=0.0)
            report["latency_ms"] = g.latency_ms
            report["healthy"] = True
        except RuvLLMError as e:
            report["error"] = str(e)
        with self._cond:
            used = sum(self._size_mb(t) for t in self._resident)
            report["loaded_models"] = list(self._resident)
        report["available_memory_mb"] = psutil.virtual_memory().available / _MB
        report["memory_budget_left_mb"] = self.system.max_memory_mb - used
        return report

    def close(self) -> None:
        """Free every model.  Generations in flight are cancelled; no model is freed while a thread is
        inside one of its decode steps (freeing llama.cpp weights under a running step crashes the process)."""
        with self._cond:
            self._closed = True
            for cancel in self._active:
                cancel.set()
            while self._stepping:  # each step is one token (or one prompt batch): short
                self._cond.wait(0.5)
            grace_until = time.monotonic() + 10.0  # an abandoned, unclosed stream must not hang close()
            while any(self._pins.get(t, 0) for t in list(self._resident) + list(self._loading)):
                if time.monotonic() > grace_until:
                    log.warning("closing the inference pool while generation streams are still open (idle)")
                    break
                self._cond.wait(0.5)
            for tier in list(self._resident):
                self._evict(tier)
            self._cond.notify_all()
        with self._tokenizer_lock:
            for tok in self._tokenizers.values():
                getattr(tok, "close", lambda: None)()
            self._tokenizers.clear()

    def __enter__(self) -> "InferencePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cancelled(loop: GenerationLoop, request: GenerationRequest, tier: str) -> Generation:
    """Close a backend loop between steps and report what it had produced as a cancelled Generation."""
    loop.close()
    elapsed = (time.perf_counter() - request.started_at) * 1e3
    return Generation(text="", tier=tier, prompt_tokens=0, completion_tokens=0, prompt_tokens_evaluated=0,
                      latency_ms=elapsed, ttft_ms=elapsed, tokens_per_s=0.0, finish_reason="cancelled")


def _deadline_before_start(tier: str, request: GenerationRequest) -> Generation:
    elapsed = (time.perf_counter() - request.started_at) * 1e3
    return Generation(text="", tier=tier, prompt_tokens=0, completion_tokens=0, prompt_tokens_evaluated=0,
                      latency_ms=elapsed, ttft_ms=elapsed, tokens_per_s=0.0, finish_reason="deadline")
