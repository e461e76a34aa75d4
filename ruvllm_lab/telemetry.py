"""Prometheus metrics under the seed's names (so its alert rules work unchanged) and optional
OpenTelemetry spans per pipeline stage."""
from __future__ import annotations

import contextlib
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
        self.memory_limit.set(limit_bytes)
        self.memory_usage.set_function(lambda: psutil.Process(os.getpid()).memory_info().rss)

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


@contextlib.contextmanager
def stage_span(stage: str, request_id: str):
    if _tracer is None:
        yield
        return
    with _tracer.start_as_current_span(f"ruvllm.{stage}") as span:
        span.set_attribute("ruvllm.request_id", request_id)
        yield
