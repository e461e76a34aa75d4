"""FastAPI server: ``create_app(config)`` builds everything at startup, nothing at import time.

Routes: ``POST /v1/query`` (JSON, or Server-Sent Events with ``"stream": true``),
``POST /v1/feedback``, ``POST /v1/sessions``, ``GET /v1/health`` (liveness: open, cheap, no
details), ``GET /v1/health/ready`` (readiness with component details; 503 when critical or
draining), ``GET /v1/metrics`` (Prometheus text).

Keys and tenants.  API keys come from the environment variable named by ``server.api_keys_env``
(comma-separated) and/or the file named by ``server.api_keys_file_env`` (one per line: ``<key>`` or
``<tenant> <key>``).  Each key is a tenant; keys are held only as SHA-256 digests and compared in
constant time.  A tenant sees and corrects only its own sessions and requests.  With no keys
configured the server is single-tenant and open.

The gate (pure ASGI, before any route runs and before the body is read): shutdown admission (503 +
Retry-After), failed-auth throttling per client address (429 before a key is even checked), the key
check (401), the per-tenant rate limit (429), and the body limit, enforced while the body streams in
(chunked or not) so no more than ``server.max_body_bytes`` is ever buffered (413).

Cancellation.  A streamed answer is cancelled the moment its response ends for any reason (client
gone included); a non-streamed one when its client disconnects.  Either frees the admission slot and
the model at once (the decode loop checks a cancel flag every step).

SIGTERM (``serve``): stop admitting (503 + Retry-After), let in-flight requests finish for up to
``server.shutdown_grace_s``, cancel the rest, then stop uvicorn; the lifespan closes RuvLLM (final
learning cycle, learned state saved, memory drained and closed, models freed only once no decode
step runs) and the process exits 0.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import MutableHeaders

from ..config import Config
from ..errors import Cancelled, ConfigError, RuvLLMError
from ..types import Constraints, Feedback
from ..types import Request as QueryRequest
from .errors import error_response, install_error_handlers
from .ratelimit import RateLimiter
from .streaming import CancellingStream, answer, open_stream
from .types import (MAX_TOKENS_CEILING, ErrorOut, FeedbackIn, FeedbackOut, HealthOut, LivenessOut, QueryIn, QueryOut,
                    SessionOut)

log = logging.getLogger("ruvllm_lab.server")

OPEN_PATHS = frozenset({"/v1/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
DRAIN_RETRY_AFTER_S = "5"  # what a client turned away during shutdown is told: the restart takes seconds
UVICORN_SETTLE_S = 5  # after drain() nothing runs; uvicorn only closes connections (idle streams) in this time
MAX_REQUEST_ID_CHARS = 64


# ---- API keys --------------------------------------------------------------------------------------
class ApiKeys:
    """API keys as SHA-256 digests, each naming a tenant.  Lookups compare every digest in constant time."""

    def __init__(self, keys: dict[str, str]):  # key -> tenant
        self._digests = [(hashlib.sha256(k.encode()).digest(), tenant) for k, tenant in keys.items()]

    @classmethod
    def from_config(cls, config: Config) -> "ApiKeys":
        keys: dict[str, str] = {}
        for key in os.environ.get(config.server.api_keys_env, "").split(","):
            if key.strip():
                keys[key.strip()] = _default_tenant(key.strip())
        path = os.environ.get(config.server.api_keys_file_env, "")
        if path:
            try:
                lines = Path(path).read_text().splitlines()
            except OSError as e:
                raise ConfigError(f"{config.server.api_keys_file_env}={path}: cannot read the API key file ({e})")
            for n, line in enumerate(lines, 1):
                parts = line.split("#", 1)[0].split()
                if not parts:
                    continue
                if len(parts) > 2:
                    raise ConfigError(f"{path}:{n}: expected `<key>` or `<tenant> <key>`")
                keys[parts[-1]] = parts[0] if len(parts) == 2 else _default_tenant(parts[0])
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def tenant_of(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = None
        for known, tenant in self._digests:  # no early exit: the time taken says nothing about which key
            if hmac.compare_digest(known, digest):
                found = tenant
        return found


def _default_tenant(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


# ---- the gate: drain, auth, rate, body size (pure ASGI) ------------------------------------------------
class _Gate:
    def __init__(self, app, *, fastapi_app: FastAPI, keys: ApiKeys, limiter: RateLimiter,
                 auth_failures: RateLimiter, max_body_bytes: int):
        self.app, self.fastapi_app, self.keys = app, fastapi_app, keys
        self.limiter, self.auth_failures, self.max_body_bytes = limiter, auth_failures, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        state = scope.setdefault("state", {})
        if getattr(self.fastapi_app.state, "draining", False) and path != "/v1/health":
            return await _respond(scope, receive, send, 503, "shutting_down",
                                  "the server is shutting down; retry shortly", {"Retry-After": DRAIN_RETRY_AFTER_S})
        client = scope["client"][0] if scope.get("client") else "unknown"
        state["tenant"] = None
        if path not in OPEN_PATHS:
            limit_key = client
            if self.keys:
                blocked = self.auth_failures.blocked_for(client)
                if blocked > 0:  # throttled before the key is looked at: a guess teaches nothing
                    return await _respond(scope, receive, send, 429, "auth_throttled",
                                          f"too many failed authentications from {client}; retry in {blocked:.0f} s",
                                          {"Retry-After": str(max(1, math.ceil(blocked)))})
                tenant = self.keys.tenant_of(_bearer(scope))
                if tenant is None:
                    self.auth_failures.acquire(client)
                    return await _respond(scope, receive, send, 401, "unauthorized",
                                          "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                          {"WWW-Authenticate": "Bearer"})
                state["tenant"] = limit_key = tenant
            wait = self.limiter.acquire(limit_key)
            if wait > 0:
                return await _respond(scope, receive, send, 429, "rate_limited",
                                      f"rate limit exceeded; retry in {wait:.1f} s",
                                      {"Retry-After": str(max(1, math.ceil(wait)))})
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        return await self._with_bounded_body(scope, receive, send)

    async def _with_bounded_body(self, scope, receive, send):
        """Read the body as it streams in, never holding more than max_body_bytes, then replay it."""
        limit = self.max_body_bytes
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _respond(scope, receive, send, 413, "body_too_large",
                                  f"request body is {length} bytes; the limit is {limit} (server.max_body_bytes)",
                                  {"Connection": "close"})
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nothing to answer
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return await _respond(scope, receive, send, 413, "body_too_large",
                                      f"request body exceeds {limit} bytes (server.max_body_bytes)",
                                      {"Connection": "close"})
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the disconnect notice, which cancels a request

        return await self.app(scope, replay, send)


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1").strip()
    return None


def _bearer(scope) -> str:
    auth = _header(scope, b"authorization") or ""
    return auth[7:].strip() if auth.lower().startswith("bearer ") else ""


async def _respond(scope, receive, send, status: int, error: str, detail: str, headers: dict | None = None):
    await error_response(status, error, detail, headers)(scope, receive, send)


class _AccessLog:
    """One JSON log line per request; sets X-Request-ID unless the response already carries its own
    (a query answer carries the id of the answer, which feedback refers to)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = (_header(scope, b"x-request-id") or "")[:MAX_REQUEST_ID_CHARS]
        request_id = incoming or uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        seen = {"status": None, "request_id": request_id}
        t = time.perf_counter()

        async def send_logged(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if "x-request-id" in headers:
                    seen["request_id"] = headers["x-request-id"]
                else:
                    headers.append("X-Request-ID", request_id)
                seen["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            log.info(json.dumps({"event": "http", "request_id": seen["request_id"], "method": scope["method"],
                                 "path": scope["path"], "status": seen["status"],
                                 "duration_ms": round((time.perf_counter() - t) * 1000, 2)}))


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


# ---- readiness -------------------------------------------------------------------------------------------
class _ReadinessCache:
    """The full health check runs a 1-token generation: reuse its report for `ttl_s` seconds."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._report: dict | None = None
        self._at = -math.inf
        self._lock = asyncio.Lock()

    async def report(self, llm) -> dict:
        async with self._lock:  # concurrent probes share one check
            if self._report is None or time.monotonic() - self._at > self.ttl_s:
                report = asdict(await run_in_threadpool(llm.health))
                report["checked_at"] = time.time()
                self._report, self._at = report, time.monotonic()
            return dict(self._report)


# ---- the app ------------------------------------------------------------------------------------------------
def create_app(config: Config, llm=None) -> FastAPI:
    """Build the app.  Without `llm`, a RuvLLM is created at startup and closed at shutdown."""
    owns_llm = llm is None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.llm is None:
            from ..orchestrator import RuvLLM
            app.state.llm = await run_in_threadpool(RuvLLM, config, start_background_learning=True)
        yield
        if owns_llm:
            log.info(json.dumps({"event": "shutdown", "detail": "final learning cycle, saving learned state, "
                                                                "draining writeback queue, freeing models"}))
            await run_in_threadpool(app.state.llm.close)

    app = FastAPI(title="RuvLLM API", version="0.1.0", description="Self-learning LLM: frozen small models, "
                  "living vector+graph memory, FastGRNN router", lifespan=lifespan,
                  responses={status: {"model": ErrorOut} for status in (400, 401, 413, 422, 429, 503)})
    app.state.llm = llm
    app.state.config = config
    app.state.draining = False
    keys = ApiKeys.from_config(config)
    max_query_chars = config.server.max_query_chars
    max_tokens_limit = config.server.max_tokens_limit
    readiness = _ReadinessCache(config.server.health_cache_s)

    install_error_handlers(app)
    app.add_middleware(_Gate, fastapi_app=app, keys=keys, limiter=RateLimiter(config.server.rate_limit_per_minute),
                       auth_failures=RateLimiter(config.server.auth_failures_per_minute),
                       max_body_bytes=config.server.max_body_bytes)
    app.add_middleware(_AccessLog)  # added last: outermost, so it logs what the gate turns away too

    def llm_of(request: Request):
        return request.app.state.llm

    def _check_query(body: QueryIn) -> None:
        if len(body.query) > max_query_chars:
            raise _HTTPError(422, "query_too_long", f"query has {len(body.query)} characters; the limit is "
                                                    f"{max_query_chars} (server.max_query_chars)")
        asked = body.constraints.max_tokens
        if asked is not None and asked > max_tokens_limit:
            raise _HTTPError(422, "max_tokens_too_large", f"constraints.max_tokens = {asked}; the limit is "
                                                          f"{max_tokens_limit} (server.max_tokens_limit)")

    @app.exception_handler(_HTTPError)
    async def _http_error(request: Request, exc: _HTTPError):
        return error_response(exc.status, exc.error, exc.detail, exc.headers)

    @app.post("/v1/query", response_model=QueryOut, summary="Process a query",
              responses={404: {"model": ErrorOut, "description": "unknown session_id"}})
    async def query(body: QueryIn, request: Request, response: Response):
        _check_query(body)
        req = QueryRequest(query=body.query, session_id=body.session_id, tenant=request.state.tenant,
                           constraints=Constraints(**body.constraints.model_dump()))
        llm = llm_of(request)
        if not body.stream:
            answered = await answer(request, llm, req)
            response.headers["X-Request-ID"] = req.request_id
            return answered.to_dict()
        stream, first = await open_stream(request, llm, req)

        async def events():
            chunk = first
            try:
                while chunk is not None:
                    yield _sse("chunk", {"text": chunk})
                    chunk = await run_in_threadpool(next, stream, None)
                yield _sse("done", stream.response.to_dict())
            except Cancelled as e:
                yield _sse("error", {"error": "cancelled", "detail": str(e)})
            except RuvLLMError as e:
                log.exception("stream %s failed", req.request_id)
                yield _sse("error", {"error": type(e).__name__, "detail": str(e)})

        return CancellingStream(events(), on_end=stream.close, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-ID": req.request_id})

    @app.post("/v1/feedback", response_model=FeedbackOut, summary="Provide feedback on a response",
              responses={404: {"model": ErrorOut, "description": "unknown or expired request_id"}})
    async def feedback(body: FeedbackIn, request: Request):
        if body.rating is None and body.correction is None:
            raise _HTTPError(422, "invalid_request", "feedback needs a rating (1-5), a correction, or both")
        fb = Feedback(request_id=body.request_id, rating=body.rating, correction=body.correction,
                      tenant=request.state.tenant)
        return await run_in_threadpool(llm_of(request).feedback, fb)

    @app.post("/v1/sessions", response_model=SessionOut, summary="Start a multi-turn session")
    async def new_session(request: Request):
        return {"session_id": llm_of(request).new_session(request.state.tenant).id}

    @app.get("/v1/health", response_model=LivenessOut, summary="Liveness (open, cheap, no details)")
    async def health(request: Request):
        return {"status": "draining" if request.app.state.draining else "ok"}

    @app.get("/v1/health/ready", response_model=HealthOut, summary="Readiness with component details (needs a key)",
             responses={503: {"model": HealthOut, "description": "System unhealthy or shutting down"}})
    async def ready(request: Request):
        report = await readiness.report(llm_of(request))
        report["draining"] = bool(request.app.state.draining)
        report["in_flight"] = llm_of(request).in_flight
        status = 503 if report["overall"] == "critical" or report["draining"] else 200
        return JSONResponse(report, status_code=status)

    @app.get("/v1/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics(request: Request):
        return Response(llm_of(request).metrics.render(), media_type="text/plain; version=0.0.4")

    _publish_config_limits(app, config)
    from .openai_api import install as install_openai_api  # it imports app-level helpers lazily: no cycle
    install_openai_api(app, config)  # /v1/chat/completions, /v1/models: the same gate, limits and loop
    return app


class _HTTPError(Exception):
    def __init__(self, status: int, error: str, detail: str, headers: dict | None = None):
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


def _publish_config_limits(app: FastAPI, config: Config) -> None:
    """Write the limits that depend on the config into the served OpenAPI document.

    The pydantic models hold the static bounds; the tiers, `server.max_query_chars` and
    `server.max_tokens_limit` are known only here. Publishing them keeps the document honest: a
    request that conforms to it is one the server accepts.
    """
    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = doc["components"]["schemas"]
            schemas["QueryIn"]["properties"]["query"]["maxLength"] = config.server.max_query_chars
            c = schemas["ConstraintsIn"]["properties"]
            _non_null(c["max_tokens"])["maximum"] = min(config.server.max_tokens_limit, MAX_TOKENS_CEILING)
            _non_null(c["model"]).update({"enum": list(config.inference.models)})
            schemas["FeedbackIn"]["anyOf"] = [  # a rating, a correction, or both (not null)
                {"required": [f], "properties": {f: _non_null(schemas["FeedbackIn"]["properties"][f])}}
                for f in ("rating", "correction")]
            ok = doc["paths"]["/v1/query"]["post"]["responses"]["200"]["content"]
            ok["text/event-stream"] = {"schema": {  # one event (OpenAPI < 3.2: `schema` describes each event)
                "type": "object", "required": ["event", "data"],
                "description": 'with "stream": true: `event: chunk` (data {"text": ...}) per piece, then '
                               '`event: done` (data: the QueryOut JSON), or `event: error` (data: '
                               '{"error", "detail"}) when the answer was cancelled or failed',
                "properties": {"event": {"enum": ["chunk", "done", "error"]}, "data": {"type": "string"}}}}
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


def _non_null(prop: dict) -> dict:
    """The non-null branch of pydantic's `X | None` (anyOf [X, null])."""
    return next(branch for branch in prop.get("anyOf", [prop]) if branch.get("type") != "null")


def serve(config: Config, host: str | None = None, port: int | None = None) -> None:
    """Run under uvicorn (TLS when server.tls_certfile/tls_keyfile are set) with a draining shutdown."""
    logging.basicConfig(level=config.system.log_level.upper(), format="%(message)s")
    tls = {}
    if config.server.tls_certfile:
        tls = {"ssl_certfile": config.server.tls_certfile, "ssl_keyfile": config.server.tls_keyfile or None}
    app = create_app(config)
    uv_config = uvicorn.Config(app, host=host or config.server.host,
                               port=config.server.port if port is None else port,
                               timeout_graceful_shutdown=UVICORN_SETTLE_S, log_level=config.system.log_level, **tls)
    _DrainingServer(uv_config, app, config.server.shutdown_grace_s).run()


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains before uvicorn is told to stop.

    Draining: the gate answers 503 + Retry-After to every new request; in-flight requests finish for up
    to `grace_s`, the rest are cancelled (RuvLLM.drain); only then does uvicorn stop, and its lifespan
    closes RuvLLM.  The signal is not handed back to uvicorn's re-raise, so the process exits 0.  A
    second signal stops at once (uvicorn's own behaviour).
    """

    def __init__(self, uv_config: uvicorn.Config, app: FastAPI, grace_s: float):
        super().__init__(uv_config)
        self._app, self._grace_s = app, grace_s
        self._drain_started = False

    def handle_exit(self, sig, frame) -> None:
        if self._drain_started:
            return super().handle_exit(sig, frame)
        self._drain_started = True
        threading.Thread(target=self._drain, name="ruvllm-drain", daemon=True).start()

    def _drain(self) -> None:
        self._app.state.draining = True
        log.info(json.dumps({"event": "draining", "grace_s": self._grace_s}))
        llm = self._app.state.llm
        try:
            if llm is not None:
                cancelled = llm.drain(self._grace_s)
                log.info(json.dumps({"event": "drained", "cancelled": cancelled}))
        except Exception:  # noqa: BLE001 - whatever happened, uvicorn must still be told to stop
            log.exception("draining failed")
        finally:
            self.should_exit = True
