"""Map the package's errors to HTTP answers with a reason (never a bare 500 for bad input)."""
from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import (Cancelled, ContextOverflow, DeadlineExceeded, ModelNotFound, Overloaded, RequestNotFound,
                      RuvLLMError, SessionNotFound, ShuttingDown)

log = logging.getLogger("ruvllm_lab.server")

RETRY_AFTER_S = "1"

# (status, error name); the first matching class wins
STATUS = [
    (ShuttingDown, 503, "shutting_down"),
    (Cancelled, 503, "cancelled"),
    (Overloaded, 503, "overloaded"),
    (RequestNotFound, 404, "request_not_found"),
    (SessionNotFound, 404, "session_not_found"),
    (ModelNotFound, 422, "model_not_found"),
    (ContextOverflow, 413, "context_overflow"),
    (DeadlineExceeded, 504, "deadline_exceeded"),
]


def error_response(status: int, error: str, detail, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        return error_response(422, "invalid_request", detail)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):  # e.g. a body that is not JSON at all
        name = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
        return error_response(exc.status_code, name, exc.detail, exc.headers)

    @app.exception_handler(RuvLLMError)
    async def _ruvllm(request: Request, exc: RuvLLMError):
        for cls, status, name in STATUS:
            if isinstance(exc, cls):
                headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
                return error_response(status, name, str(exc), headers)
        log.exception("unhandled pipeline error")
        return error_response(500, "internal_error", str(exc))

    @app.exception_handler(ValueError)
    async def _value(request: Request, exc: ValueError):
        return error_response(422, "invalid_request", str(exc))
