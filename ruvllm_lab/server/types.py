"""HTTP request/response schemas (the seed's §6.1 OpenAPI, made strict)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_ID_CHARS = 128
MAX_CORRECTION_CHARS = 4_000
# At least one character that Python's str.strip() keeps (JSON Schema patterns search, not match).
# Spelled out rather than `\S`: ECMAScript, Rust (pydantic) and Python disagree on what `\s` covers.
NOT_BLANK = r"[^\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
MAX_TOKENS_CEILING = 4_096  # server.max_tokens_limit may lower it, never raise it


def integral_float_to_int(value: Any) -> Any:
    """The request models are strict ("1" is not a number, "true" not a boolean), but JSON Schema's
    integer includes 177.0, which strict pydantic would refuse: integral floats become ints first."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class ConstraintsIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    max_latency_ms: int | None = Field(None, ge=1, le=600_000)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CEILING)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    model: str | None = Field(None, min_length=1, max_length=256, description="force a tier")

    _integers = field_validator("max_latency_ms", "max_tokens", mode="before")(integral_float_to_int)


class QueryIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    query: str = Field(..., min_length=1, pattern=NOT_BLANK, description="The user query")
    session_id: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS, description="Optional session for multi-turn")
    constraints: ConstraintsIn = Field(default_factory=ConstraintsIn)
    stream: bool = Field(False, description="answer with Server-Sent Events")


class SourceOut(BaseModel):
    node_id: int
    text: str
    score: float
    kind: str


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    prompt_tokens_evaluated: int


class QueryOut(BaseModel):
    text: str
    confidence: float
    request_id: str
    sources: list[SourceOut]
    routing_info: dict[str, Any]
    latency_ms: dict[str, float]
    usage: UsageOut
    session_id: str | None = None
    finish_reason: str


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    request_id: str = Field(..., min_length=1, max_length=MAX_ID_CHARS)
    rating: int | None = Field(None, ge=1, le=5)
    correction: str | None = Field(None, min_length=1, max_length=MAX_CORRECTION_CHARS, pattern=NOT_BLANK)

    _integers = field_validator("rating", mode="before")(integral_float_to_int)


class FeedbackOut(BaseModel):
    request_id: str
    recorded: bool
    score: float | None = None
    correction_node: int | None = None


class SessionOut(BaseModel):
    session_id: str


class ComponentOut(BaseModel):
    healthy: bool
    latency_ms: float | None = None
    error: str | None = None
    details: dict[str, Any] = {}


class HealthOut(BaseModel):
    overall: Literal["healthy", "degraded", "critical"]
    memory: ComponentOut
    router: ComponentOut
    inference: ComponentOut
    draining: bool = False
    in_flight: int = Field(0, description="requests holding an admission slot now (not cached)")
    checked_at: float | None = Field(None, description="unix time of the probe this report comes from "
                                                       "(reused for server.health_cache_s)")


class LivenessOut(BaseModel):
    status: Literal["ok", "draining"]


class ErrorOut(BaseModel):
    error: str
    detail: Any = None
