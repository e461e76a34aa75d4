"""Prometheus metrics under the seed's names (so its alert rules work unchanged), a breakdown of
the process's memory (what a soak needs to tell a leak from a filling cache), and optional
OpenTelemetry spans per pipeline stage."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

try:  # tracing is optional: a span per stage when opentelemetry is installed
    from opentelemetry import trace as _otel_trace
    _tracer = _otel_trace.get_tracer("ruvllm_lab")
except ImportError:  # pragma: no cover - depends on the environment
    _tracer = None

# Stage latencies run from ~50 µs (routing) to seconds (generation).
LATENCY_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    """One registry per RuvLLM instance, so tests and notebooks can hold several."""

    def __init__(self, limit_bytes: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram("ruvllm_request_latency_seconds", "Latency per pipeline stage ('total' = whole request)",
                                 ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.quality = Gauge("ruvllm_quality_score", "Most recent judged answer quality in [0, 1]", registry=r)
        self.router_confidence = Gauge("ruvllm_router_confidence", "Router confidence of the latest decision",
                                       registry=r)
        self.errors = Counter("ruvllm_errors_total", "Failed requests by stage", ["stage"], registry=r)
        self.memory_usage = Gauge("ruvllm_memory_usage_bytes", "Resident memory of this process", registry=r)
        self.memory_limit = Gauge("ruvllm_memory_limit_bytes", "Configured memory budget (system.max_memory_mb)",
                                  registry=r)
        self.requests = Counter("ruvllm_requests", "Answered requests per model tier", ["tier"], registry=r)
        self.learning_cycles = Counter("ruvllm_learning_cycles", "Learning cycles run (router, memory edges, attention)",
                                       registry=r)
        self.memory_limit.set(limit_bytes)
        self.memory_usage.set_function(lambda: psutil.Process(os.getpid()).memory_info().rss)
        # Where the resident memory is (process_memory()): one child per part, read when scraped.
        self.memory_parts = Gauge("ruvllm_process_memory_bytes", "Process memory by part: rss_anon (heap, "
                                  "arenas), rss_file (mapped files: model weights, libraries), malloc_in_use / "
                                  "malloc_free (glibc heap: live blocks / freed but still held), sqlite (SQLite's "
                                  "own allocations: page caches, schemas)", ["part"], registry=r)
        for part in process_memory():
            self.memory_parts.labels(part=part).set_function(lambda part=part: process_memory().get(part, 0))

    def observe_request(self, tier: str, latency_ms: dict[str, float], router_confidence: float,
                        quality: float | None) -> None:
        for stage, ms in latency_ms.items():
            self.latency.labels(stage=stage).observe(ms / 1000.0)
        self.requests.labels(tier=tier).inc()
        self.router_confidence.set(router_confidence)
        if quality is not None:
            self.quality.set(quality)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33 struct mallinfo2: every field a size_t
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return None


def _load_sqlite():
    """The libsqlite3 that Python's sqlite3 module is linked against (same process-wide counters)."""
    try:
        import _sqlite3
        lib = ctypes.CDLL(_sqlite3.__file__)  # its dependency libsqlite3 is loaded; symbols resolve through it
        lib.sqlite3_status64.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64),
                                         ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
        return lib
    except (OSError, AttributeError, ImportError):  # statically linked without the symbol exported, ...
        return None


_LIBC = _load_libc()
_SQLITE = _load_sqlite()
SQLITE_STATUS_MEMORY_USED = 0


def process_memory() -> dict[str, int]:
    """This process's memory in bytes, by part (each only where the platform can tell):

    * ``rss_anon`` / ``rss_file``: resident anonymous memory (heaps, arenas, tensors) and resident
      pages of mapped files (model weights, shared libraries; clean, reclaimable, bounded by file size)
      -- Linux ``/proc/self/status``;
    * ``malloc_in_use`` / ``malloc_free``: glibc heap blocks live now (mmapped chunks included) and
      freed ones the allocator still holds (fragmentation; ``malloc_trim`` returns what it can);
    * ``sqlite``: bytes SQLite itself has allocated (page caches of every open connection, schemas).
    """
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    out["rss_" + key[3:].lower()] = int(value.split()[0]) * 1024
    except OSError:
        pass
    if _LIBC is not None:
        mi = _LIBC.mallinfo2()
        out["malloc_in_use"] = int(mi.uordblks + mi.hblkhd)
        out["malloc_free"] = int(mi.fordblks)
    if _SQLITE is not None:
        cur, high = ctypes.c_int64(), ctypes.c_int64()
        if _SQLITE.sqlite3_status64(SQLITE_STATUS_MEMORY_USED, ctypes.byref(cur), ctypes.byref(high), 0) == 0:
            out["sqlite"] = int(cur.value)
    return out


def release_free_heap() -> bool:
    """Hand the glibc heap's free pages back to the OS (``malloc_trim(0)``: every arena, not only the
    top of the main one).  Worth it after a burst that freed much, e.g. a learning cycle's training
    temporaries; a no-op elsewhere.  Returns whether memory was released."""
    return bool(_LIBC.malloc_trim(0)) if _LIBC is not None else False


@contextlib.contextmanager
def stage_span(stage: str, request_id: str):
    if _tracer is None:
        yield
        return
    with _tracer.start_as_current_span(f"ruvllm.{stage}") as span:
        span.set_attribute("ruvllm.request_id", request_id)
        yield
