"""FastAPI server: ``create_app(config)`` builds everything at startup, nothing at import time.

Routes: ``POST /v1/query`` (JSON, or Server-Sent Events with ``"stream": true``),
``POST /v1/feedback``, ``POST /v1/sessions``, ``GET /v1/health`` (200 healthy/degraded,
503 critical), ``GET /v1/metrics`` (Prometheus text).

When the environment variable named by ``server.api_keys_env`` (default ``RUVLLM_API_KEYS``,
comma-separated) is set, every route but health needs ``Authorization: Bearer <key>``.
Limits: per-key token-bucket rate (429 + Retry-After), body size (413), field sizes (422),
``system.max_concurrent_requests`` (503 + Retry-After).  SIGTERM: uvicorn stops accepting,
finishes in-flight requests, then the lifespan closes RuvLLM (drains the writeback queue,
saves learned state).  Feedback is written to SQLite before it is acknowledged.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..config import Config
from ..types import Constraints, Feedback
from ..types import Request as QueryRequest
from .errors import error_response, install_error_handlers
from .ratelimit import RateLimiter
from .types import MAX_TOKENS_CEILING, ErrorOut, FeedbackIn, FeedbackOut, HealthOut, QueryIn, QueryOut, SessionOut

log = logging.getLogger("ruvllm_lab.server")


class _AuthAndLimits:
    """Bearer-key check and per-key rate limit, as one dependency."""

    def __init__(self, keys: set[str], limiter: RateLimiter):
        self.keys = keys
        self.limiter = limiter

    def __call__(self, request: Request) -> str:
        client = request.client.host if request.client else "unknown"
        key = client
        if self.keys:
            auth = request.headers.get("authorization", "")
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if token not in self.keys:
                raise _HTTPError(401, "unauthorized", "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                 {"WWW-Authenticate": "Bearer"})
            key = token
        wait = self.limiter.acquire(key)
        if wait > 0:
            raise _HTTPError(429, "rate_limited", f"rate limit exceeded; retry in {wait:.1f} s",
                             {"Retry-After": str(max(1, math.ceil(wait)))})
        return key


class _HTTPError(Exception):
    def __init__(self, status: int, error: str, detail: str, headers: dict | None = None):
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


def _body_limit_middleware(app: FastAPI, max_bytes: int) -> None:
    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return error_response(413, "body_too_large", f"request body is {length} bytes; the limit is {max_bytes} "
                                                        f"(server.max_body_bytes)")
        if request.method == "POST" and length is None:  # chunked: count what actually arrives
            body = await request.body()
            if len(body) > max_bytes:
                return error_response(413, "body_too_large", f"request body exceeds {max_bytes} bytes")
        return await call_next(request)


def _access_log_middleware(app: FastAPI) -> None:
    @app.middleware("http")
    async def access_log(request: Request, call_next):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        request.state.request_id = request_id
        t = time.perf_counter()
        response = await call_next(request)
        response.headers["X-Request-ID"] = request_id
        log.info(json.dumps({"event": "http", "request_id": request_id, "method": request.method,
                             "path": request.url.path, "status": response.status_code,
                             "duration_ms": round((time.perf_counter() - t) * 1000, 2)}))
        return response


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
            log.info(json.dumps({"event": "shutdown", "detail": "draining writeback queue, saving learned state"}))
            await run_in_threadpool(app.state.llm.close)

    app = FastAPI(title="RuvLLM API", version="0.1.0", description="Self-learning LLM: frozen small models, "
                  "living vector+graph memory, FastGRNN router", lifespan=lifespan,
                  responses={status: {"model": ErrorOut} for status in (400, 401, 413, 422, 429, 503)})
    app.state.llm = llm
    app.state.config = config
    keys = {k.strip() for k in os.environ.get(config.server.api_keys_env, "").split(",") if k.strip()}
    guard = _AuthAndLimits(keys, RateLimiter(config.server.rate_limit_per_minute))
    max_query_chars = config.server.max_query_chars
    max_tokens_limit = config.server.max_tokens_limit

    install_error_handlers(app)

    @app.exception_handler(_HTTPError)
    async def _http_error(request: Request, exc: _HTTPError):
        return error_response(exc.status, exc.error, exc.detail, exc.headers)

    _body_limit_middleware(app, config.server.max_body_bytes)
    _access_log_middleware(app)

    def llm_of(request: Request):
        return request.app.state.llm

    @app.post("/v1/query", response_model=QueryOut, summary="Process a query",
              responses={404: {"model": ErrorOut, "description": "unknown session_id"}})
    async def query(body: QueryIn, request: Request, _key: str = Depends(guard)):
        if len(body.query) > max_query_chars:
            raise _HTTPError(422, "query_too_long", f"query has {len(body.query)} characters; the limit is "
                                                    f"{max_query_chars} (server.max_query_chars)")
        asked = body.constraints.max_tokens
        if asked is not None and asked > max_tokens_limit:
            raise _HTTPError(422, "max_tokens_too_large", f"constraints.max_tokens = {asked}; the limit is "
                                                          f"{max_tokens_limit} (server.max_tokens_limit)")
        req = QueryRequest(query=body.query, session_id=body.session_id,
                           constraints=Constraints(**body.constraints.model_dump()))
        llm = llm_of(request)
        if not body.stream:
            response = await run_in_threadpool(llm.query_with, req)
            return response.to_dict()
        stream = llm.query_stream(req)
        first = await run_in_threadpool(next, stream, None)  # admission errors surface here, before headers

        def events():
            chunk = first
            while chunk is not None:
                yield f"event: chunk\ndata: {json.dumps({'text': chunk})}\n\n"
                chunk = next(stream, None)
            yield f"event: done\ndata: {json.dumps(stream.response.to_dict(), default=str)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-ID": req.request_id})

    @app.post("/v1/feedback", response_model=FeedbackOut, summary="Provide feedback on a response",
              responses={404: {"model": ErrorOut, "description": "unknown or expired request_id"}})
    async def feedback(body: FeedbackIn, request: Request, _key: str = Depends(guard)):
        if body.rating is None and body.correction is None:
            raise _HTTPError(422, "invalid_request", "feedback needs a rating (1-5), a correction, or both")
        fb = Feedback(request_id=body.request_id, rating=body.rating, correction=body.correction)
        return await run_in_threadpool(llm_of(request).feedback, fb)

    @app.post("/v1/sessions", response_model=SessionOut, summary="Start a multi-turn session")
    async def new_session(request: Request, _key: str = Depends(guard)):
        return {"session_id": llm_of(request).new_session().id}

    @app.get("/v1/health", response_model=HealthOut, summary="Health check",
             responses={503: {"model": HealthOut, "description": "System unhealthy"}})
    async def health(request: Request):
        report = await run_in_threadpool(llm_of(request).health)
        status = 503 if report.overall == "critical" else 200
        return JSONResponse(asdict(report), status_code=status)

    @app.get("/v1/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics(request: Request, _key: str = Depends(guard)):
        return Response(llm_of(request).metrics.render(), media_type="text/plain; version=0.0.4")

    _publish_config_limits(app, config)
    return app


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
                               '`event: done` (data: the QueryOut JSON)',
                "properties": {"event": {"enum": ["chunk", "done"]}, "data": {"type": "string"}}}}
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


def _non_null(prop: dict) -> dict:
    """The non-null branch of pydantic's `X | None` (anyOf [X, null])."""
    return next(branch for branch in prop.get("anyOf", [prop]) if branch.get("type") != "null")


def serve(config: Config, host: str | None = None, port: int | None = None) -> None:
    """Run under uvicorn; TLS when server.tls_certfile/tls_keyfile are set."""
    import uvicorn

    logging.basicConfig(level=config.system.log_level.upper(), format="%(message)s")
    tls = {}
    if config.server.tls_certfile:
        tls = {"ssl_certfile": config.server.tls_certfile, "ssl_keyfile": config.server.tls_keyfile or None}
    uvicorn.run(create_app(config), host=host or config.server.host, port=config.server.port if port is None else port,
                timeout_graceful_shutdown=30, log_level=config.system.log_level, **tls)
