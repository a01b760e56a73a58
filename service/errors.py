"""Domain exceptions, and their mapping to HTTP in one place (registered by the app factory)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import math

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.chat_template import ChatTemplateError
from service.engine.base import OverMemoryBudget, PromptTooLong
from service.observability import request_id
from service.scheduler import GenerationFailed, QueueFull, SchedulerStopped

log = logging.getLogger(__name__)


class ModelNotReady(Exception):
    """The model is still loading or warming up (or its warm-up failed)."""


class OpenAIError(Exception):
    """An error of the /v1 API, answered in OpenAI's envelope:
    `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


class PromptsTooLong(Exception):
    """One or more prompts do not fit the context window with the requested max_tokens, or
    could never run within the memory budget."""

    def __init__(self, problems: Sequence[PromptTooLong | OverMemoryBudget]):
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = list(problems)


def _unavailable(detail: str, retry_after: int) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": str(retry_after)})


async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
    return _unavailable(str(exc), retry_after=1)


async def _not_ready(request: Request, exc: ModelNotReady) -> JSONResponse:
    return _unavailable(str(exc), retry_after=5)


async def _stopped(request: Request, exc: SchedulerStopped) -> JSONResponse:
    return _unavailable(str(exc), retry_after=5)


async def _too_long(request: Request, exc: PromptsTooLong) -> JSONResponse:
    # The shape of FastAPI's own validation errors, so clients parse one format.
    detail = [
        {"type": "prompt_too_long", "loc": ["body", "prompts", p.index], "msg": str(p),
         "ctx": {"excess_tokens": p.excess}} if isinstance(p, PromptTooLong) else
        {"type": "over_memory_budget", "loc": ["body", "max_tokens"], "msg": str(p),
         "ctx": {"needed_bytes": p.need, "budget_bytes": p.budget}}
        for p in exc.problems
    ]
    return JSONResponse({"detail": detail}, status_code=422)


def _undecodable_body(exc: StarletteHTTPException) -> RequestValidationError | None:
    """FastAPI answers a JSON body that is not even text (bytes that decode in no Unicode
    encoding) with a 400 its OpenAPI document does not list; it is invalid JSON like any other,
    so it gets the 422 `json_invalid` that `{not json` gets."""
    cause = exc.__cause__
    if exc.status_code != 400 or not isinstance(cause, UnicodeDecodeError):
        return None
    return RequestValidationError([{"type": "json_invalid", "loc": ("body", cause.start), "msg": "JSON decode error",
                                    "input": {}, "ctx": {"error": f"the body is not UTF-8, UTF-16 or UTF-32 text "
                                                                  f"({cause.reason} at byte {cause.start})"}}])


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    invalid = _undecodable_body(exc)
    if invalid is not None:
        return await _invalid_request(request, invalid)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own body, except that NaN and Infinity (which Python's JSON parser accepts) are
    # echoed as strings: as floats they cannot be encoded, and the error would become a 500.
    return JSONResponse({"detail": _finite(jsonable_encoder(exc.errors()))}, status_code=422)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


async def _generation_failed(request: Request, exc: GenerationFailed) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=500)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    # Answered by Starlette's outermost middleware, past the one that adds the id to the others.
    headers = {"X-Request-ID": request_id()} if request_id() else None
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500, headers=headers)


def _openai(exc: OpenAIError) -> JSONResponse:
    body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    headers = exc.headers
    if exc.status == 500 and request_id():  # see _unexpected
        headers = (headers or {}) | {"X-Request-ID": request_id()}
    return JSONResponse(body, status_code=exc.status, headers=headers)


async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
    return _openai(exc)


def _as_openai(exc: Exception) -> OpenAIError:
    """The /v1 face of the service's own errors."""
    if isinstance(exc, StarletteHTTPException):
        exc = _undecodable_body(exc) or exc
    if isinstance(exc, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return OpenAIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers,
                           type="invalid_request_error" if exc.status_code < 500 else "server_error")
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return OpenAIError(400, f"The body is not valid JSON: {first.get('ctx', {}).get('error', 'decode error')}")
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        where = ".".join(loc)
        return OpenAIError(400, f"{where}: {first.get('msg', 'invalid request')}" if where else
                           first.get("msg", "invalid request"), param=loc[0] if loc else None)
    if isinstance(exc, ChatTemplateError):  # the model's template refused the messages, or is broken
        return OpenAIError(400, str(exc), param="messages", code="chat_template_error")
    if isinstance(exc, QueueFull):
        return OpenAIError(429, str(exc), type="server_overloaded", headers={"Retry-After": "1"})
    if isinstance(exc, (ModelNotReady, SchedulerStopped)):
        return OpenAIError(503, str(exc), type="service_unavailable", headers={"Retry-After": "5"})
    if isinstance(exc, GenerationFailed):
        return OpenAIError(500, str(exc), type="server_error")
    log.exception("unhandled error on %s", type(exc).__name__)
    return OpenAIError(500, f"internal error: {type(exc).__name__}", type="server_error")


def _by_path(handler):
    """/v1 answers in OpenAI's envelope; the rest as FastAPI does."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        if request.url.path.startswith("/v1/"):
            return _openai(_as_openai(exc))
        return await handler(request, exc)

    return handle


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(StarletteHTTPException, _by_path(_http_error))
    app.add_exception_handler(RequestValidationError, _by_path(_invalid_request))
    app.add_exception_handler(QueueFull, _by_path(_queue_full))
    app.add_exception_handler(ModelNotReady, _by_path(_not_ready))
    app.add_exception_handler(SchedulerStopped, _by_path(_stopped))
    app.add_exception_handler(PromptsTooLong, _too_long)
    app.add_exception_handler(GenerationFailed, _by_path(_generation_failed))
    # Raised by /v1/chat/completions alone; anywhere else it would be a bug.
    app.add_exception_handler(ChatTemplateError, _by_path(_unexpected))
    app.add_exception_handler(Exception, _by_path(_unexpected))
