"""The seed's HealthCheck: memory, router and inference each healthy or unhealthy with a latency;
overall healthy, degraded (router down: a fallback tier still answers) or critical (no memory or
no model)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

CRITICAL_COMPONENTS = ("memory", "inference")


@dataclass
class ComponentHealth:
    healthy: bool
    latency_ms: float | None = None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class HealthReport:
    overall: str  # "healthy" | "degraded" | "critical"
    memory: ComponentHealth
    router: ComponentHealth
    inference: ComponentHealth

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _probe(fn) -> ComponentHealth:
    t = time.perf_counter()
    try:
        details = fn() or {}
    except Exception as e:  # a health check reports failures, it does not raise them
        return ComponentHealth(False, error=f"{type(e).__name__}: {e}")
    return ComponentHealth(True, latency_ms=(time.perf_counter() - t) * 1000, details=details)


def overall_status(components: dict[str, ComponentHealth]) -> str:
    if all(c.healthy for c in components.values()):
        return "healthy"
    if any(not components[name].healthy for name in CRITICAL_COMPONENTS):
        return "critical"
    return "degraded"


def check_health(memory, router, pool, dimension: int) -> HealthReport:
    from .router import RouterInput

    def ping_memory():
        memory.ping()
        return {"nodes": memory.count()}

    def ping_router():
        x = RouterInput(query_vec=np.zeros(dimension, np.float32), query_tokens=1, top_similarity=0.0, hit_count=0,
                        mean_degree=0.0, session_turn=0, tier_quality={}, max_latency_ms=None, max_tokens=None)
        d = router.route(x)
        return {"router": d.router, "probe_tier": d.tier}

    def ping_inference():
        info = pool.health_check()
        if not info.get("healthy"):
            raise RuntimeError(info.get("error", "no model answered the probe"))
        return {k: info[k] for k in ("loaded_models", "available_memory_mb", "latency_ms") if k in info}

    parts = {"memory": _probe(ping_memory), "router": _probe(ping_router), "inference": _probe(ping_inference)}
    return HealthReport(overall=overall_status(parts), **parts)
