"""Error hierarchy. Every message says what went wrong and what to do about it."""
from __future__ import annotations


class RuvLLMError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(RuvLLMError, ValueError):
    """A config problem; `.problems` lists every one found, each naming its key."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


class ModelNotFound(RuvLLMError, KeyError):
    """An unknown tier name, or a tier whose package is not installed."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "model not found"


class ModelLoadError(RuvLLMError):
    """A model file exists but cannot be loaded (truncated or corrupt GGUF, out of memory)."""


class ContextOverflow(RuvLLMError, ValueError):
    """The prompt does not fit `inference.max_context` and overflow is configured as an error."""


class DeadlineExceeded(RuvLLMError, TimeoutError):
    """The request's latency budget was spent before any output could be produced."""


class DimensionMismatch(RuvLLMError, ValueError):
    """A vector or a store whose dimension differs from the configured one."""


class MemoryStoreError(RuvLLMError):
    """The memory store cannot be opened or written."""


class SessionNotFound(RuvLLMError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "session not found"


class RequestNotFound(RuvLLMError, KeyError):
    """Feedback names a request id this system has not answered (or has forgotten)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "request not found"


class Overloaded(RuvLLMError):
    """More concurrent requests than `system.max_concurrent_requests`."""


class ShuttingDown(Overloaded):
    """The system is draining for shutdown and admits no new requests."""


class Cancelled(RuvLLMError):
    """The request was cancelled (its client went away, or shutdown outlasted its grace period);
    nothing of it was written back."""
