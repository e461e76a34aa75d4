"""Schemas of the OpenAI-compatible routes (``/v1/chat/completions``, ``/v1/models``).

Requests are strict like the seed's (no coercion, unknown fields refused), and the published
schema says exactly what is accepted: a conversation needs a user message, a user message is
not blank, and only the sampling parameters the loop can honour exist. Responses follow
OpenAI's ``chat.completion`` / ``chat.completion.chunk`` / ``list`` objects, plus one
extension field, ``ruvllm`` (see ``RuvLLMExtension``).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .types import MAX_ID_CHARS, MAX_TOKENS_CEILING, NOT_BLANK, SourceOut, integral_float_to_int

AUTO_MODEL = "ruvllm-auto"  # the router chooses the tier
# OpenAI allows 2048 messages; the loop replays only `prompt.history_turns` turns, and the served
# schema spells "the last message is the user's" out per length (JSON Schema has no "last item").
MAX_MESSAGES = 64
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_CHARS = 64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class UserTextPart(_Strict):
    type: Literal["text"]
    text: str = Field(..., pattern=NOT_BLANK)


class SystemMessage(_Strict):
    role: Literal["system"]
    content: str | list[TextPart]
    name: str | None = Field(None, min_length=1, max_length=64)


class DeveloperMessage(_Strict):
    role: Literal["developer"]
    content: str | list[TextPart]
    name: str | None = Field(None, min_length=1, max_length=64)


class UserMessage(_Strict):
    role: Literal["user"]
    content: Annotated[str, Field(pattern=NOT_BLANK)] | Annotated[list[UserTextPart], Field(min_length=1)]
    name: str | None = Field(None, min_length=1, max_length=64)


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, min_length=1, max_length=64)


ChatMessage = Annotated[Union[SystemMessage, DeveloperMessage, UserMessage, AssistantMessage],
                        Field(discriminator="role")]


def message_texts(message: SystemMessage | DeveloperMessage | UserMessage | AssistantMessage) -> list[str]:
    """The message's strings: its content, or the text of each part ([""] for no parts)."""
    content = message.content
    return [content] if isinstance(content, str) else [part.text for part in content] or [""]


def message_text(message: SystemMessage | DeveloperMessage | UserMessage | AssistantMessage) -> str:
    return "\n".join(message_texts(message))


StopSequence = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionIn(_Strict):
    """The subset of OpenAI's chat-completions request that the loop can honour.

    ``max_completion_tokens`` wins over its deprecated alias ``max_tokens``; ``seed`` is accepted
    (lm-evaluation-harness sends one) and ignored: sampling is the server's.
    """
    model: str = Field(..., min_length=1, max_length=256,
                       description=f"a tier name (forces that tier) or {AUTO_MODEL!r} (the router chooses)")
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES,
                                        description="ends with a user message: the question; earlier turns are "
                                                    "history, system/developer text is prefixed to the question")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CEILING)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CEILING)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: StopSequence | Annotated[list[StopSequence], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, description="one choice per request")
    seed: int | None = Field(None, description="accepted and ignored")
    user: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS,
                             description="a stable end-user id: the server keeps that user's conversation as a "
                                         "session (warm KV prefix)")

    _integers = field_validator("max_tokens", "max_completion_tokens", "n", "seed", mode="before")(
        integral_float_to_int)

    @property
    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def completion_tokens_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses ------------------------------------------------------------------------------

class RuvLLMExtension(BaseModel):
    """What the loop adds to an OpenAI answer: enough to send feedback and to see why it answered so.

    ``request_id`` is also the completion's ``id`` and the ``X-RuvLLM-Request-ID`` header; send it
    to ``POST /v1/feedback``. ``finish_reason`` is the loop's own ("deadline" appears to OpenAI
    clients as "length").
    """
    request_id: str
    tier: str
    forced: bool
    session_id: str | None = None
    confidence: float
    sources: list[SourceOut]
    routing_info: dict[str, Any]
    latency_ms: dict[str, float]
    finish_reason: str
    prompt_tokens_evaluated: int


class AssistantOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChoiceOut(BaseModel):
    index: int = 0
    message: AssistantOut
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(..., description="prompt tokens served from the session's KV prefix")


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatCompletionOut(BaseModel):
    id: str = Field(..., description="the loop's request id (for /v1/feedback)")
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = Field(..., description="the tier that answered")
    choices: list[ChoiceOut]
    usage: UsageOut
    system_fingerprint: None = None
    ruvllm: RuvLLMExtension


class DeltaOut(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoiceOut(BaseModel):
    index: int = 0
    delta: DeltaOut
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunkOut(BaseModel):
    """One SSE event (``data: <this JSON>``); the last event is ``data: [DONE]``.

    The chunk with ``finish_reason`` carries ``ruvllm``; with ``stream_options.include_usage`` one
    more chunk with empty ``choices`` carries ``usage``.
    """
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoiceOut]
    usage: UsageOut | None = None
    system_fingerprint: None = None
    ruvllm: RuvLLMExtension | None = None


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelListOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorOut(BaseModel):
    error: OpenAIErrorBody
