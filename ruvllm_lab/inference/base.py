"""The backend contract every inference engine implements, and the `Generation` result.

A backend owns one loaded model.  It is *not* thread-safe: the pool serialises calls
per model (one generation at a time, a FIFO wait queue in front of it).  Every backend
drives generation token by token so that deadlines, stop sequences, prefix reuse and
log-probabilities behave the same whichever engine runs underneath.

Timing contract (all in milliseconds, measured from `GenerationRequest.started_at`,
which the pool sets on entry, so queue wait and a lazy load count):
    ttft_ms        time until the first completion token was sampled
    latency_ms     time until generation finished
    tokens_per_s   decode rate = (completion_tokens - 1) / (t_last - t_first); 0.0 when < 2 tokens
"""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Generator, Iterator

import numpy as np

FINISH_REASONS = ("stop", "length", "deadline")


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
    finish_reason: str  # "stop" | "length" | "deadline"
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

    def deadline_passed(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline


# A backend's token loop: yields text chunks, returns the Generation (StopIteration.value).
GenerationLoop = Generator[str, None, Generation]


class Backend(abc.ABC):
    """One loaded model.  Construction loads it; `close()` frees it."""

    tier: str
    n_ctx: int

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


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator,
                 top_k: int = 40) -> int:
    """Greedy at temperature 0 (deterministic); else top-k then nucleus (top-p) sampling.

    p_i ∝ exp(logit_i / T) over the top-k logits, then the smallest set whose mass ≥ top_p.
    """
    if temperature <= 0.0:
        return int(np.argmax(logits))
    k = min(top_k, logits.shape[0])
    idx = np.argpartition(logits, -k)[-k:]
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
    """log softmax(logits)[token], computed stably in float64."""
    z = logits.astype(np.float64)
    m = z.max()
    return float(z[token] - m - np.log(np.exp(z - m).sum()))


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
