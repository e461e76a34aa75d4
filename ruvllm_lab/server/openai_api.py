"""OpenAI-compatible routes over the whole loop: ``POST /v1/chat/completions``, ``GET /v1/models``.

``install(app, config)`` adds them to the seed's app behind the same gate (API key = tenant,
rate limit, body limit, shutdown admission), with the same size limits (``server.max_query_chars``,
``server.max_tokens_limit``), the same admission control (``system.max_concurrent_requests``) and
the same cancellation when the client goes away. Every completion runs ``RuvLLM.query_with`` /
``query_stream`` for the caller's tenant: memory, router, generation, judge, writeback.

How OpenAI's request maps onto the loop
---------------------------------------
* ``model``: a tier name forces that tier (``Constraints.model``); ``"ruvllm-auto"`` lets the
  router choose. The answer's ``model`` is the tier that answered.
* ``messages``: the last message must be the user's; its text is the question (memory search,
  routing, writeback all key on it). ``system``/``developer`` text is put before the question,
  because the loop's own system prompt frames the memory notes. Earlier user/assistant pairs are
  the conversation's history: they become the turns of a session, which the loop replays into
  the prompt (its last ``prompt.history_turns``).
* ``user``: the conversation lives on in a session kept per (tenant, user). While the client's
  history matches that session's turns the session is reused as it is, so the inference pool
  keeps the KV prefix warm; a client that edits or trims its history gets the session reset to
  what it sent. Without ``user``, a request with history gets a fresh session seeded from it.
* ``max_completion_tokens`` (or ``max_tokens``), ``temperature``, ``top_p`` -> ``Constraints``.
  ``stop`` -> ``Constraints.stop``: generation ends at the first stop sequence, and the stored
  answer is what the client got; the text is also cut here, so a stop string that a backend
  emitted across token boundaries never reaches the client.
* ``seed`` is accepted and ignored; ``n`` must be 1.

What comes back besides OpenAI's fields
---------------------------------------
The completion's ``id`` *is* the loop's request id, so an OpenAI-only client sends
``completion.id`` to ``POST /v1/feedback``. The same id is in the ``X-RuvLLM-Request-ID`` header
and in the ``ruvllm`` extension field (tier, forced, session_id, confidence, sources,
routing_info, latency_ms, the loop's finish_reason), which the ``openai`` package keeps as
``completion.ruvllm`` (pydantic extra). Non-streamed answers also carry ``X-RuvLLM-Tier``;
streamed ones carry it only when the tier was forced (the router decides after the headers
left), and the finishing chunk carries ``ruvllm`` with the tier.

Errors on these routes use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``,
with 400 (not 422) for invalid requests, 401, 404 (unknown model), 413, 429, 503, 504.
"""
from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.datastructures import MutableHeaders

from ..config import Config
from ..errors import RuvLLMError, SessionNotFound
from ..inference.base import TextAssembler
from ..types import Constraints, Response, Turn
from ..types import Request as QueryRequest
from .streaming import CancellingStream, answer, open_stream
from .errors import STATUS
from .openai_types import (AUTO_MODEL, MAX_MESSAGES, AssistantOut, ChatCompletionChunkOut, ChatCompletionIn,
                           ChatCompletionOut, ChoiceOut, ChunkChoiceOut, DeltaOut, ModelListOut, ModelOut,
                           OpenAIErrorOut, PromptTokensDetails, RuvLLMExtension, UserMessage, UsageOut, message_text,
                           message_texts)
from .types import MAX_TOKENS_CEILING, SourceOut

OWNER = "ruvllm-lab"
PATHS = ("/v1/chat/completions", "/v1/models")  # the route family that answers errors in OpenAI's shape
ERROR_STATUSES = (400, 401, 404, 413, 429, 500, 503, 504)
# the seed's error names -> OpenAI's codes where OpenAI has its own name for the same thing
OPENAI_CODES = {"unauthorized": "invalid_api_key", "rate_limited": "rate_limit_exceeded",
                "context_overflow": "context_length_exceeded", "invalid_request": "invalid_request_error"}
TIER_HEADER, REQUEST_ID_HEADER = "X-RuvLLM-Tier", "X-RuvLLM-Request-ID"


def install(app: FastAPI, config: Config) -> None:
    """Add the routes, OpenAI's error shape for what the gate answers on them, and their
    config-dependent schema limits.  Call it last in ``create_app`` (it wraps ``app.openapi``)."""
    app.include_router(_router(config))
    app.add_middleware(_OpenAIErrorShape)
    _publish_limits(app, config)


class _OpenAIRoute(APIRoute):
    """Errors raised while a route of this family runs are answered in OpenAI's shape, with
    OpenAI's statuses (400 for an invalid request, where the seed's routes say 422)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def shaped(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as exc:
                errors = exc.errors()
                params = [_param(list(e.get("loc", ()))) for e in errors]
                message = "; ".join(f"{p or 'body'}: {e.get('msg')}" for p, e in zip(params, errors))
                return openai_error(400, message, param=next((p for p in params if p), None),
                                    code=errors[0].get("type") if errors else None)
            except (RuvLLMError, ValueError) as exc:
                status, code = _status_of(exc)
                return openai_error(status, str(exc), code=code,
                                    headers={"Retry-After": "1"} if status == 503 else None)

        return shaped


# ---- routes -------------------------------------------------------------------------------------

def _router(config: Config) -> APIRouter:
    tiers = [str(m) for m in config.inference.models]
    model_ids = [*tiers, AUTO_MODEL]
    started = int(time.time())
    max_chars, max_tokens_limit = config.server.max_query_chars, config.server.max_tokens_limit
    sessions = _UserSessions()
    router = APIRouter(tags=["OpenAI-compatible"], route_class=_OpenAIRoute,
                       responses={s: {"model": OpenAIErrorOut} for s in ERROR_STATUSES})

    @router.get("/v1/models", response_model=ModelListOut, summary="List models (the tiers and ruvllm-auto)")
    async def list_models():
        return ModelListOut(data=[ModelOut(id=m, created=started, owned_by=OWNER) for m in model_ids])

    @router.get("/v1/models/{model_id:path}", response_model=ModelOut, summary="Retrieve a model")
    async def get_model(model_id: str):
        if model_id not in model_ids:
            return _unknown_model(model_id, model_ids)
        return ModelOut(id=model_id, created=started, owned_by=OWNER)

    @router.post("/v1/chat/completions", response_model=ChatCompletionOut, summary="Chat completion through the loop")
    async def chat_completions(body: ChatCompletionIn, request: Request):
        if body.model not in model_ids:
            return _unknown_model(body.model, model_ids)
        limit = body.completion_tokens_limit
        if limit is not None and limit > max_tokens_limit:
            param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            return openai_error(400, f"{param} = {limit}; the limit is {max_tokens_limit} (server.max_tokens_limit)",
                                param=param, code="max_tokens_too_large")
        for i, message in enumerate(body.messages):
            longest = max(map(len, message_texts(message)))
            if longest > max_chars:
                return openai_error(400, f"messages[{i}] has a text of {longest} characters; the limit is "
                                         f"{max_chars} (server.max_query_chars)", param=f"messages[{i}].content",
                                    code="query_too_long")
        try:
            question, history = conversation(body.messages)
        except ValueError as exc:
            return openai_error(400, str(exc), param="messages", code="invalid_messages")
        llm, tenant = request.app.state.llm, request.state.tenant
        session_id = await run_in_threadpool(sessions.bind, llm, tenant, body.user, history)
        forced = body.model if body.model != AUTO_MODEL else None
        req = QueryRequest(query=question, session_id=session_id, tenant=tenant, constraints=Constraints(
            max_tokens=limit, temperature=body.temperature, top_p=body.top_p, model=forced,
            stop=body.stop_sequences or None))
        headers = {REQUEST_ID_HEADER: req.request_id, "X-Request-ID": req.request_id}
        created = int(time.time())
        if not body.stream:
            response = await answer(request, llm, req)
            assembler = TextAssembler(body.stop_sequences)
            assembler.feed(response.text.encode())
            text = assembler.text if assembler.stopped else response.text
            headers[TIER_HEADER] = response.routing_info["tier"]
            out = completion(response, text, "stop" if assembler.stopped else response.finish_reason, created)
            return JSONResponse(out.model_dump(), headers=headers)
        if forced is not None:
            headers[TIER_HEADER] = forced
        stream, first = await open_stream(request, llm, req)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _sse(stream, first, body.stop_sequences, body.model, created, include_usage)
        return CancellingStream(events, on_end=stream.close, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **headers})

    return router


async def _sse(stream, first: str | None, stop: list[str], requested_model: str, created: int, include_usage: bool):
    """OpenAI's chunk sequence: a role delta, content deltas, a finishing chunk (with ``ruvllm``),
    optionally a usage chunk, then ``[DONE]``.  Chunks carry the requested model until the tier is
    known.  Text after a stop sequence is read from the loop (so the judge and writeback still run)
    but not sent."""
    request_id = stream.request.request_id

    def event(model: str, choices: list[ChunkChoiceOut], **extra) -> str:
        chunk = ChatCompletionChunkOut(id=request_id, created=created, model=model, choices=choices, **extra)
        return f"data: {json.dumps(chunk.model_dump(exclude_none=True))}\n\n"

    def delta(text: str) -> str:
        return event(requested_model, [ChunkChoiceOut(delta=DeltaOut(content=text))])

    assembler = TextAssembler(stop)
    try:
        yield event(requested_model, [ChunkChoiceOut(delta=DeltaOut(role="assistant", content=""))])
        piece = first
        while piece is not None:
            if not assembler.stopped and (text := assembler.feed(piece.encode())):
                yield delta(text)
            piece = await run_in_threadpool(next, stream, None)
        if text := assembler.finish():
            yield delta(text)
        response: Response = stream.response
        finish = "stop" if assembler.stopped else response.finish_reason
        tier = response.routing_info["tier"]
        yield event(tier, [ChunkChoiceOut(delta=DeltaOut(), finish_reason=_openai_finish(finish))],
                    ruvllm=extension(response, finish))
        if include_usage:
            yield event(tier, [], usage=usage(response))
    except (RuvLLMError, ValueError) as exc:  # headers are gone: the error is an event (openai raises APIError)
        status, code = _status_of(exc)
        yield f"data: {json.dumps(error_body(str(exc), status, code=code))}\n\n"
    yield "data: [DONE]\n\n"


# ---- messages -> the loop's question and history ------------------------------------------------------

def conversation(messages: list) -> tuple[str, list[tuple[str, str]]]:
    """(question, [(user, assistant), ...]) from OpenAI messages.

    System and developer text is put before the question and before each historical user turn
    (the same way, so a replayed history matches the session's turns). Consecutive messages of
    one role are joined by a blank line. Raises ValueError when the last message is not the user's.
    """
    if not isinstance(messages[-1], UserMessage):
        raise ValueError(f"the last message must have role 'user' (the question), not {messages[-1].role!r}")
    instructions = "\n\n".join(message_text(m) for m in messages if m.role in ("system", "developer")
                               and message_text(m).strip())
    turns: list[tuple[str, list[str]]] = []  # (role, texts), consecutive roles merged
    for m in messages:
        if m.role in ("user", "assistant"):
            if turns and turns[-1][0] == m.role:
                turns[-1][1].append(message_text(m))
            else:
                turns.append((m.role, [message_text(m)]))

    def ask(texts: list[str]) -> str:
        question = "\n\n".join(texts)
        return f"{instructions}\n\n{question}" if instructions else question

    history, pending = [], None
    for role, texts in turns[:-1]:
        if role == "user":
            pending = ask(texts)
        else:  # an assistant turn with no user turn before it answers an empty question
            history.append((pending or "", "\n\n".join(texts).strip()))
            pending = None
    return ask(turns[-1][1]), history


class _UserSessions:
    """Sessions for OpenAI conversations; one per (tenant, ``user``), fresh ones for anonymous history."""

    def __init__(self):
        self._ids: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()

    def bind(self, llm, tenant: str | None, user: str | None, history: list[tuple[str, str]]) -> str | None:
        if user is None and not history:
            return None  # a single question: no session, like /v1/query without session_id
        session = None
        if user is not None:
            with self._lock:
                sid = self._ids.get((tenant, user))
            if sid is not None:
                try:
                    session = llm.get_session(sid, tenant)
                except SessionNotFound:  # the loop forgot it (least recently used)
                    session = None
        if session is None:
            session = llm.new_session(tenant)
            if user is not None:
                with self._lock:
                    self._ids[(tenant, user)] = session.id
                    self._ids.move_to_end((tenant, user))
                    while len(self._ids) > llm.config.system.max_sessions:
                        self._ids.popitem(last=False)
        if [(t.query, t.answer.strip()) for t in session.turns] != history:
            # The client's messages are the truth; the loop keeps no request ids for these turns.
            session.turns[:] = [Turn(query=q, answer=a, request_id="", prompt=q) for q, a in history]
        return session.id


# ---- responses ---------------------------------------------------------------------------------------

def _openai_finish(finish: str) -> str:
    return "stop" if finish == "stop" else "length"  # "deadline": cut short, like a length limit


def usage(response: Response) -> UsageOut:
    u = response.usage
    return UsageOut(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                    total_tokens=u.prompt_tokens + u.completion_tokens,
                    prompt_tokens_details=PromptTokensDetails(
                        cached_tokens=max(0, u.prompt_tokens - u.prompt_tokens_evaluated)))


def extension(response: Response, finish: str) -> RuvLLMExtension:
    info = response.routing_info
    return RuvLLMExtension(
        request_id=response.request_id, tier=info["tier"], forced=bool(info.get("forced")),
        session_id=response.session_id, confidence=response.confidence,
        sources=[SourceOut(node_id=s.node_id, text=s.text, score=s.score, kind=s.kind) for s in response.sources],
        routing_info=info, latency_ms=response.latency_ms, finish_reason=finish,
        prompt_tokens_evaluated=response.usage.prompt_tokens_evaluated)


def completion(response: Response, text: str, finish: str, created: int) -> ChatCompletionOut:
    return ChatCompletionOut(
        id=response.request_id, created=created, model=response.routing_info["tier"],
        choices=[ChoiceOut(message=AssistantOut(content=text), finish_reason=_openai_finish(finish))],
        usage=usage(response), ruvllm=extension(response, finish))


# ---- errors in OpenAI's shape -----------------------------------------------------------------------------

def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    return OpenAIErrorOut.model_validate({"error": {"message": message, "type": _error_type(status), "param": param,
                                                    "code": code}}).model_dump()


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status, headers=headers)


def _unknown_model(model: str, model_ids: list[str]) -> JSONResponse:
    return openai_error(404, f"The model {model!r} does not exist; models: {', '.join(model_ids)} (GET /v1/models)",
                        param="model", code="model_not_found")


def _status_of(exc: Exception) -> tuple[int, str]:
    """(status, code) of an error raised by the loop; a context overflow is OpenAI's 400."""
    for cls, status, name in STATUS:
        if isinstance(exc, cls):
            return (400 if name == "context_overflow" else status), OPENAI_CODES.get(name, name)
    if isinstance(exc, ValueError):
        return 400, "invalid_request_error"
    return 500, "internal_error"


def _param(loc: list) -> str | None:
    """["body", "messages", 0, "content"] -> "messages[0].content" (OpenAI names params so); None
    when the error is about the body as a whole (not JSON, not an object)."""
    parts = loc[1:] if loc and loc[0] == "body" else loc
    if not parts or not isinstance(parts[0], str):
        return None
    out = str(parts[0])
    for part in parts[1:]:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def from_seed_error(status: int, payload) -> dict:
    """The seed's ``{"error": name, "detail": text}`` in OpenAI's shape (same status)."""
    name = payload.get("error") if isinstance(payload, dict) else None
    detail = payload.get("detail") if isinstance(payload, dict) else payload
    message = detail if isinstance(detail, str) else json.dumps(detail) if detail is not None else str(name)
    return error_body(message, status, code=OPENAI_CODES.get(name, name) if isinstance(name, str) else None)


class _OpenAIErrorShape:
    """Pure ASGI: what the gate (401, 429, 413, 503) or Starlette (405) answers on this route family
    is rewritten into OpenAI's shape, keeping status and headers.  Answers the routes made
    themselves are already in that shape and pass through, as does every success."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not any(path == p or path.startswith(p + "/") for p in PATHS):
            return await self.app(scope, receive, send)
        held: dict = {}

        async def send_shaped(message):
            if message["type"] == "http.response.start":
                if message["status"] < 400:
                    held["pass"] = True
                    return await send(message)
                held["start"], held["body"] = message, bytearray()
                return
            if held.get("pass") or message["type"] != "http.response.body":
                return await send(message)
            held["body"] += message.get("body", b"")
            if message.get("more_body", False):
                return
            start = held["start"]
            try:
                payload = json.loads(held["body"])
            except ValueError:
                payload = {"error": None, "detail": held["body"].decode("utf-8", "replace")}
            if not (isinstance(payload, dict) and isinstance(payload.get("error"), dict)):
                payload = from_seed_error(start["status"], payload)
            body = json.dumps(payload).encode()
            headers = MutableHeaders(raw=list(start["headers"]))
            headers["content-type"] = "application/json"
            headers["content-length"] = str(len(body))
            await send({**start, "headers": headers.raw})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_shaped)


# ---- the served OpenAPI document ------------------------------------------------------------------------

def _publish_limits(app: FastAPI, config: Config) -> None:
    """Put the config's limits into the served document, as the seed does for /v1/query: the model
    ids, the token ceiling, the per-message character limit, that the last message is the user's,
    and the SSE answer."""
    base = app.openapi
    model_ids = [*map(str, config.inference.models), AUTO_MODEL]

    def openapi() -> dict:
        doc = base()
        schemas = doc["components"]["schemas"]
        body = schemas.get("ChatCompletionIn")
        if body is None or body.get("x-ruvllm-limits"):
            return doc
        body["x-ruvllm-limits"] = True
        props = body["properties"]
        props["model"]["enum"] = model_ids
        user = {"$ref": "#/components/schemas/UserMessage"}
        props["messages"]["anyOf"] = [  # the last message is the user's: one branch per length
            {"minItems": n, "maxItems": n, "prefixItems": [True] * (n - 1) + [user]}
            for n in range(1, MAX_MESSAGES + 1)]
        for field in ("max_tokens", "max_completion_tokens"):
            _non_null(props[field])["maximum"] = min(config.server.max_tokens_limit, MAX_TOKENS_CEILING)
        for name in ("SystemMessage", "DeveloperMessage", "UserMessage", "AssistantMessage"):
            for branch in schemas[name]["properties"]["content"]["anyOf"]:
                if branch.get("type") == "string":
                    branch["maxLength"] = config.server.max_query_chars
                else:  # text parts: each part is bounded by the same limit
                    part = schemas[branch["items"]["$ref"].rsplit("/", 1)[1]]
                    part["properties"]["text"]["maxLength"] = config.server.max_query_chars
        for param in doc["paths"]["/v1/models/{model_id}"]["get"]["parameters"]:
            param["schema"]["enum"] = model_ids  # another id is a 404, as OpenAI answers it
        ok = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
        ok["text/event-stream"] = {"schema": {  # one event, as the seed's /v1/query publishes its stream
            "type": "object", "required": ["data"],
            "description": 'with "stream": true: unnamed events whose data is a chat.completion.chunk JSON (the '
                           'finishing one carries `ruvllm`) or an OpenAI error JSON, then `data: [DONE]`',
            "properties": {"event": {"enum": ["message"]}, "data": {"type": "string"}}}}
        return doc

    app.openapi = openapi


def _non_null(prop: dict) -> dict:
    return next(branch for branch in prop.get("anyOf", [prop]) if branch.get("type") != "null")

