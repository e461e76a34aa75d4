"""Per-client token bucket: `rate_per_minute` tokens, refilled continuously, burst = one minute's worth."""
from __future__ import annotations

import threading
import time


class RateLimiter:
    def __init__(self, rate_per_minute: int, clock=time.monotonic):
        self.rate = rate_per_minute / 60.0  # tokens per second
        self.capacity = float(rate_per_minute)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)
        self._lock = threading.Lock()

    def blocked_for(self, key: str) -> float:
        """Seconds until `key` has a token again, without taking one (0.0 when it has one now)."""
        if self.capacity <= 0:
            return 0.0
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, self._clock()))
        tokens = min(self.capacity, tokens + (self._clock() - last) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def acquire(self, key: str) -> float:
        """0.0 when allowed; otherwise the seconds to wait before the next token."""
        if self.capacity <= 0:
            return 0.0
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
