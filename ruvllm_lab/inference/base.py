"""The backend contract every inference engine implements, the `Generation` result, and the
one token loop (`TokenDecoder`) every backend drives.

A backend owns one loaded model.  A backend whose `batches` is False is *not* thread-safe:
the pool serialises its calls (one generation at a time, a FIFO wait queue in front of it).
A backend whose `batches` is True (llama.cpp, transformers) takes concurrent `run` calls and
decodes them together, one batch per step.  Either way the per-request logic (sampling, stop sequences,
max_tokens, deadlines, cancellation, log-probabilities, streamed text) lives in
`TokenDecoder`, so a fix there reaches every engine; a backend supplies only "next logits"
and "feed token".

Timing contract (all in milliseconds, measured from `GenerationRequest.started_at`,
which the pool sets on entry, so queue wait and a lazy load count):
    ttft_ms        time until the first completion token was sampled
    latency_ms     time until generation finished
    tokens_per_s   decode rate = (completion_tokens - 1) / (t_last - t_first); 0.0 when < 2 tokens
"""
from __future__ import annotations

import abc
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Generator

import numpy as np

from ..errors import RuvLLMError

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "deadline", "cancelled")


@dataclass
class Generation:
    """One completed generation.

    `prompt_tokens` counts the prompt after templating (and truncation); of those,
    `prompt_tokens_evaluated` were actually run through the model (the rest came
    from a session's cached prefix).  `logprobs[i]` is log p(token_i | prefix) under
    the raw (temperature-1) distribution, when requested.
    """
    text: str
    tier: str
    prompt_tokens: int
    completion_tokens: int
    prompt_tokens_evaluated: int
    latency_ms: float
    ttft_ms: float
    tokens_per_s: float
    finish_reason: str  # "stop" | "length" | "deadline" | "cancelled"
    logprobs: list[float] | None = None
    truncated: bool = False


@dataclass
class GenerationRequest:
    """What a backend needs for one call; the pool fills every default from the config."""
    messages: list[dict]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str] = field(default_factory=list)
    deadline: float | None = None  # time.perf_counter() value after which generation stops
    session_id: str | None = None
    logprobs: bool = False
    started_at: float = field(default_factory=time.perf_counter)
    cancel: threading.Event | None = None  # set by the caller (e.g. client disconnect): stop at the next step

    def deadline_passed(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def interrupted(self) -> str | None:
        """'cancelled' or 'deadline' when generation must stop now, else None."""
        if self.cancelled():
            return "cancelled"
        return "deadline" if self.deadline_passed() else None


# A backend's token loop: yields text chunks, returns the Generation (StopIteration.value).
GenerationLoop = Generator[str, None, Generation]


class Backend(abc.ABC):
    """One loaded model.  Construction loads it; `close()` frees it."""

    tier: str
    n_ctx: int
    batches: bool = False  # True: `run` is thread-safe and concurrent calls share decode steps

    @abc.abstractmethod
    def run(self, request: GenerationRequest) -> GenerationLoop:
        """Generate for `request`, yielding text chunks whose concatenation is `Generation.text`."""

    def generate(self, request: GenerationRequest) -> Generation:
        return drain(self.run(request))

    @abc.abstractmethod
    def embed(self, texts: list[str]) -> np.ndarray:
        """(n, hidden) float32: mean over tokens of the final hidden states (not normalised)."""

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of `text` as plain text (no template, no BOS)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free the model; the backend is unusable afterwards."""


@dataclass(eq=False)
class ScheduledJob:
    """One request inside a ScheduledBackend's scheduler (backends add their own placement fields)."""
    decoder: TokenDecoder
    prompt: list[int]
    session: str | None
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # ("text", str) | ("done", Generation) | ("error", exc)
    abandoned: bool = False  # the consumer closed the stream


class ScheduledBackend(Backend):
    """A backend whose scheduler thread alone runs the model (continuous batching): the caller's
    thread queues a job (a ``ScheduledJob``) and relays its events (``_relay``); the scheduler
    (``_serve``) admits waiting jobs into free sequences and runs one batched step at a time.
    Subclasses set ``_cond``, ``_pending``, ``_stopping`` and ``n_seq``, and supply
    ``_active_jobs``, ``_admit``, ``_step`` and ``_end``."""

    batches = True
    _cond: threading.Condition
    _pending: deque
    _stopping: bool

    def _relay(self, job) -> GenerationLoop:
        with self._cond:
            if self._stopping:
                raise RuvLLMError(f"tier {self.tier!r} is closed")
            self._pending.append(job)
            self._cond.notify_all()
        finished = False
        try:
            while True:
                kind, value = job.events.get()
                if kind == "text":
                    yield value
                elif kind == "done":
                    finished = True
                    return value
                else:
                    finished = True
                    raise value
        finally:
            if not finished:  # the consumer went away (stream closed, exception): free the sequence
                job.abandoned = True
                with self._cond:
                    self._cond.notify_all()
                # wait until the scheduler has let go of it (within one step), so the sequence is
                # free when close() returns
                while job.events.get()[0] not in ("done", "error"):
                    pass


    def _serve(self) -> None:
        """The scheduler thread: until close(), admit waiting jobs and run one step for all."""
        while True:
            with self._cond:
                while not self._stopping and not self._pending and not self._active_jobs():
                    self._cond.wait()
                if self._stopping:
                    break
                admitted = self._take_pending()
            try:
                for job in admitted:
                    self._admit(job)
                self._step()
            except Exception as e:  # a failure of the batched step itself: every request in it gets the error
                log.exception("batch step of tier %r failed", self.tier)
                for job in self._active_jobs():
                    self._end(job, error=e)
        err = RuvLLMError(f"tier {self.tier!r} was closed while generating")
        for job in self._active_jobs():
            self._end(job, error=err)
        with self._cond:
            pending, self._pending = list(self._pending), deque()
        for job in pending:
            job.events.put(("error", err))

    def _finish(self, job, reason: str | None = None) -> None:
        """Hand `job` its last text and its result (``reason`` overrides the decoder's own)."""
        tail = job.decoder.finish(reason)
        if tail:
            job.events.put(("text", tail))
        job.events.put(("done", job.decoder.result()))
        with self._cond:
            self._cond.notify_all()

    def _take_pending(self) -> list:
        """(Under the lock.)  Pop waiting jobs for the free sequences; finish those already over."""
        free = self.n_seq - len(self._active_jobs())
        admitted = []
        for job in list(self._pending):
            if job.abandoned or job.decoder.interrupt():
                self._pending.remove(job)
                self._finish(job, "cancelled" if job.abandoned else None)
            elif len(admitted) < free:
                self._pending.remove(job)
                admitted.append(job)
        return admitted


def drain(loop: GenerationLoop) -> Generation:
    """Run a generation loop to the end and return its Generation."""
    try:
        while True:
            next(loop)
    except StopIteration as stop:
        return stop.value


class TextAssembler:
    """Turns completion tokens' bytes into the chunks a stream yields.

    Holds back (a) an incomplete UTF-8 sequence and (b) any tail that could still
    become a stop sequence, so the concatenated chunks always equal the final text
    and a stop string never leaks into the output.  Leading whitespace of the answer
    is dropped (a completion prompt ends in "Answer:", the model continues " Paris").
    """

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self._bytes = bytearray()
        self._emitted = 0  # characters of `text` already yielded
        self.text = ""
        self.stopped = False  # a stop sequence was found

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that is now safe to emit."""
        self._bytes.extend(piece)
        text = self._bytes.decode("utf-8", errors="ignore").lstrip()
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                self.text = text[:at]
                self.stopped = True
                return self._flush(len(self.text))
        # an unfinished multi-byte character decodes to nothing yet: keep it back
        self.text = text
        return self._flush(max(self._emitted, len(text) - self._holdback))

    def finish(self) -> str:
        """Emit everything that is left (generation ended for another reason)."""
        if not self.stopped:
            self.text = self._bytes.decode("utf-8", errors="ignore").lstrip()
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        chunk = self.text[self._emitted:upto]
        self._emitted = max(self._emitted, upto)
        return chunk


def decode_rate(completion_tokens: int, t_first: float | None, t_last: float | None) -> float:
    if completion_tokens < 2 or t_first is None or t_last is None or t_last <= t_first:
        return 0.0
    return (completion_tokens - 1) / (t_last - t_first)


TOP_K_BLOCK = 128  # logits per block in top_k_indices' pre-filter


def top_k_indices(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` largest logits (in no particular order; ties broken arbitrarily).

    np.argpartition over a 49k vocabulary costs ~0.5 ms, once per sequence per batch step.  The
    k-th largest of the block maxima is a lower bound of the k-th largest logit (the maxima are a
    subset of the logits), so every top-k logit is among those at or above it: a few dozen to a
    few hundred, partitioned instead of the whole vocabulary (~15x faster, the same set)."""
    n = logits.shape[0]
    whole = n // TOP_K_BLOCK * TOP_K_BLOCK
    if k >= n or whole // TOP_K_BLOCK <= k:
        return np.argpartition(logits, n - k)[n - k:] if k < n else np.arange(n)
    maxima = logits[:whole].reshape(-1, TOP_K_BLOCK).max(axis=1)  # (n // block,)
    floor = np.partition(maxima, maxima.shape[0] - k)[maxima.shape[0] - k]
    candidates = np.flatnonzero(logits >= floor)  # >= k of them, every top-k logit included
    return candidates[np.argpartition(logits[candidates], candidates.shape[0] - k)[candidates.shape[0] - k:]]


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator,
                 top_k: int = 40) -> int:
    """Greedy at temperature 0 (deterministic); else top-k then nucleus (top-p) sampling.

    p_i ∝ exp(logit_i / T) over the top-k logits, then the smallest set whose mass ≥ top_p.
    """
    if temperature <= 0.0:
        return int(np.argmax(logits))
    idx = top_k_indices(logits, min(top_k, logits.shape[0]))
    z = logits[idx].astype(np.float64)
    with np.errstate(over="ignore"):  # a tiny T sends every gap to -inf: exp gives 0, never NaN
        z = (z - z.max()) / temperature
    order = np.argsort(-z)
    idx, z = idx[order], z[order]
    p = np.exp(z)
    p /= p.sum()
    if 0.0 < top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
        idx, p = idx[:keep], p[:keep] / p[:keep].sum()
    return int(idx[rng.choice(len(idx), p=p)])


def token_logprob(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token], computed stably: exp in float32 (13x faster than float64 over a
    49k vocabulary; runs once per token of every sequence in a batch step), the sum in float64."""
    z = np.asarray(logits, np.float32)
    m = z.max()
    return float(z[token] - m - np.log(np.exp(z - m).sum(dtype=np.float64)))


def fit_prompt(tokens: list[int], n_ctx: int, max_tokens: int, on_overflow: str,
               keep_first: bool = False) -> tuple[list[int], bool]:
    """Make the prompt leave room for min(max_tokens, n_ctx // 2) generated tokens.

    A longer prompt is left-truncated (the oldest tokens go; a leading BOS is kept when
    `keep_first`) and flagged, or raises `ContextOverflow` when `on_overflow == "error"`.
    Returns (tokens, truncated).
    """
    from ..errors import ContextOverflow

    room = n_ctx - min(max_tokens, n_ctx // 2)
    if len(tokens) <= room:
        return tokens, False
    if on_overflow == "error":
        raise ContextOverflow(
            f"prompt is {len(tokens)} tokens but inference.max_context={n_ctx} leaves room for {room} "
            f"(after reserving {n_ctx - room} for the answer); shorten the prompt, raise inference.max_context, "
            f"or set inference.on_context_overflow='truncate'")
    if keep_first and tokens:
        return tokens[:1] + tokens[len(tokens) - room + 1:], True
    return tokens[len(tokens) - room:], True


def common_prefix_len(a, b) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class TokenDecoder:
    """One request's side of the token loop, shared by every backend.

    The backend computes logits; `accept(logits)` samples a token, applies end-of-generation,
    stop sequences, max_tokens, deadline and cancellation, records the log-probability (only
    when the request asked for it: the softmax over the vocabulary is the costly part), and
    returns the text now safe to stream.  While `finish_reason` is None the backend feeds
    `next_token` to the model and calls `accept` again with the logits that follow.

    `new_bytes(completion)` returns the bytes the newest completion token adds to the text
    (llama.cpp: the token's piece; transformers: the difference of two decodes).
    """

    def __init__(self, request: GenerationRequest, prompt_tokens: int, max_new: int, stop: list[str],
                 is_end: Callable[[int], bool], new_bytes: Callable[[list[int]], bytes],
                 rng: np.random.Generator, tier: str, truncated: bool = False):
        self.request, self.prompt_tokens, self.max_new, self.tier = request, prompt_tokens, max_new, tier
        self.truncated = truncated
        self._is_end, self._new_bytes, self._rng = is_end, new_bytes, rng
        self.assembler = TextAssembler(stop)
        self.completion: list[int] = []
        self.logprobs: list[float] | None = [] if request.logprobs else None
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.finish_reason: str | None = None if max_new > 0 else "length"
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self.evaluated = 0  # prompt tokens run through the model (the rest were a cached prefix)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def interrupt(self) -> bool:
        """Finish now if the request was cancelled or its deadline passed; True if it did."""
        if self.finish_reason is None:
            self.finish_reason = self.request.interrupted()
        return self.finish_reason is not None

    def accept(self, logits: np.ndarray) -> str:
        """Sample the next token from `logits` (vocab,); return text to stream ('' if none yet)."""
        req = self.request
        token = sample_token(logits, req.temperature, req.top_p, self._rng)
        self.t_last = time.perf_counter()
        self.t_first = self.t_first or self.t_last
        self.next_token = None
        if self._is_end(token):
            self.finish_reason = "stop"
            return ""
        self.completion.append(token)
        if self.logprobs is not None:
            self.logprobs.append(token_logprob(logits, token))
        text = self.assembler.feed(self._new_bytes(self.completion))
        if self.assembler.stopped:
            self.finish_reason = "stop"
        elif len(self.completion) >= self.max_new:
            self.finish_reason = "length"
        elif not self.interrupt():
            self.next_token = token
        return text

    def finish(self, reason: str | None = None) -> str:
        """End generation (`reason` if it has not ended yet); return the text still held back."""
        self.finish_reason = self.finish_reason or reason or "length"
        self.next_token = None
        return self.assembler.finish()

    def result(self) -> Generation:
        end = time.perf_counter()
        started = self.request.started_at
        return Generation(
            text=self.assembler.text, tier=self.tier, prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.completion), prompt_tokens_evaluated=self.evaluated,
            latency_ms=(end - started) * 1e3, ttft_ms=((self.t_first or end) - started) * 1e3,
            tokens_per_s=decode_rate(len(self.completion), self.t_first, self.t_last),
            finish_reason=self.finish_reason or "length", logprobs=self.logprobs, truncated=self.truncated)
