"""Core request/response types shared by the SDK, the server and the experiments."""
from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any


def new_id(prefix: str = "") -> str:
    return f"{prefix}{uuid.uuid4().hex[:16]}"


@dataclass
class Constraints:
    max_latency_ms: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    model: str | None = None  # force a tier, bypassing the router
    stop: list[str] | None = None  # generation ends before the first of these strings


@dataclass
class Request:
    query: str
    session_id: str | None = None
    constraints: Constraints = field(default_factory=Constraints)
    gold_answer: str | None = None  # experiments: lets the judge score against a known answer
    request_id: str = field(default_factory=lambda: new_id("req-"))
    tenant: str | None = None  # the API key's tenant (server); None = single-tenant use of the SDK

    def __post_init__(self) -> None:
        if not isinstance(self.query, str) or not self.query.strip():
            raise ValueError("query must be a non-empty string")
        if isinstance(self.constraints, dict):
            self.constraints = Constraints(**self.constraints)


@dataclass
class Source:
    node_id: int
    text: str
    score: float
    kind: str = "interaction"
    provenance: str = ""  # how the model was told where this note comes from (context.provenance)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_evaluated: int = 0  # after KV/prefix reuse

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Response:
    text: str
    confidence: float
    request_id: str
    sources: list[Source] = field(default_factory=list)
    routing_info: dict[str, Any] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)  # per stage, plus "total"
    usage: Usage = field(default_factory=Usage)
    session_id: str | None = None
    finish_reason: str = "stop"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Turn:
    query: str
    answer: str
    request_id: str
    prompt: str = ""  # the user message as sent (with memory notes); replayed verbatim so the KV prefix matches


@dataclass
class Session:
    id: str = field(default_factory=lambda: new_id("sess-"))
    turns: list[Turn] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    router_state: Any = None  # FastGRNN hidden state carried across turns
    tenant: str | None = None  # sessions are private to their tenant

    @property
    def turn_index(self) -> int:
        return len(self.turns)


@dataclass
class Feedback:
    request_id: str
    rating: int | None = None  # 1..5
    correction: str | None = None
    tenant: str | None = None  # only the tenant that asked may rate or correct a request

    def __post_init__(self) -> None:
        if self.rating is not None and (isinstance(self.rating, bool) or not isinstance(self.rating, int)
                                        or not 1 <= self.rating <= 5):
            raise ValueError(f"rating must be an integer from 1 to 5, got {self.rating!r}")
        if self.rating is None and not (self.correction and self.correction.strip()):
            raise ValueError("feedback needs a rating, a correction, or both")
