"""What an operator sees of each request: its id, its access line, its HTTP metrics, and the log
format (LOG_FORMAT=text|json).

One pure ASGI middleware (`RequestContextMiddleware`, the outermost of ours) gives every request
an id (a client's `X-Request-ID`, sanitised, or a new one), echoes it in the response, keeps it in
a context variable that a logging filter adds to every record logged while the request runs,
counts the request by route and status, and writes the request's access line when it ends.
uvicorn's own access log is dropped, so the format is ours; /health stays out of the access log.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

MAX_REQUEST_ID = 128
_NOT_IN_ID = re.compile(r"[^A-Za-z0-9._:@/+=-]")
QUIET_PATHS = frozenset({"/health"})  # Docker's health check asks every few seconds: not news

access_log = logging.getLogger("service.access")


@dataclass
class RequestContext:
    """One request as the logs see it. The routes attach the scheduler's requests they submit,
    so the access line can say how long the request's prompts waited and took to a first token."""

    id: str
    started: float = field(default_factory=time.monotonic)
    generations: list = field(default_factory=list)  # service.scheduler.Request

    def timings(self) -> dict[str, float]:
        rows = [row for request in self.generations for row in request.rows]
        waits = [row.admitted - row.enqueued for row in rows if row.admitted is not None]
        firsts = [row.first_token - row.enqueued for row in rows if row.first_token is not None]
        out = {}
        if waits:
            out["queue_wait_ms"] = round(max(waits) * 1000, 2)
        if firsts:
            out["ttft_ms"] = round(min(firsts) * 1000, 2)
        return out


current_request: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("request", default=None)


def attach(generation) -> None:
    """Tell the current request's access line about a scheduler request it submitted."""
    context = current_request.get()
    if context is not None:
        context.generations.append(generation)


def request_id() -> str | None:
    context = current_request.get()
    return context.id if context is not None else None


def sanitised_request_id(value: str | None) -> str:
    """The client's id with only [A-Za-z0-9._:@/+=-] kept and cut to 128 characters, or a new one
    (32 hex digits) when nothing is left."""
    kept = _NOT_IN_ID.sub("", value or "")[:MAX_REQUEST_ID]
    return kept or uuid.uuid4().hex


class RequestContextMiddleware:
    """Request id, HTTP metrics and the access line (see the module's docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"x-request-id"), None)
        context = RequestContext(sanitised_request_id(incoming))
        current_request.set(context)  # the request's own task: the value ends with it
        status = 500  # what the client gets if the app raises before answering

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", context.id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.monotonic() - context.started
            route = _route_label(scope)
            metrics = _metrics(scope)
            if metrics is not None:
                metrics.observe_request(scope["method"], route, status, seconds)
            if scope["path"] not in QUIET_PATHS:
                _log_access(scope, status, seconds, context)


def _route_label(scope) -> str:
    """The route's path template, so the label has few values: the router's match, or for a
    request answered before routing (401, 413) its path if the OpenAPI document has it (every
    path of this API is fixed); else "unmatched"."""
    route = getattr(scope.get("route"), "path", None)
    if route is not None:
        return route
    app = scope.get("app")
    documented = app.openapi()["paths"] if hasattr(app, "openapi") else {}
    return scope["path"] if scope["path"] in documented else "unmatched"


def _metrics(scope):
    runtime = getattr(getattr(scope.get("app"), "state", None), "runtime", None)
    return getattr(runtime, "metrics", None)


def _log_access(scope, status: int, seconds: float, context: RequestContext) -> None:
    client = scope.get("client")
    fields = {"method": scope["method"], "path": scope["path"], "status": status,
              "duration_ms": round(seconds * 1000, 2), **context.timings(),
              "client": f"{client[0]}:{client[1]}" if client else None}
    timings = "".join(f" {name} {fields[name]}" for name in ("queue_wait_ms", "ttft_ms") if name in fields)
    access_log.info("%s %s %s %.1f ms%s", fields["method"], fields["path"], status, fields["duration_ms"], timings,
                    extra={"access": fields})


# --- Logging -----------------------------------------------------------------------------------

class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every record (`request_id`, "-" outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id when a
    request is running, an access line's fields, and the traceback of an exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", "-") != "-":
            entry["request_id"] = record.request_id
        entry |= getattr(record, "access", {})
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def configure_logging(settings) -> None:
    """Every record through one root handler in LOG_FORMAT, with request ids. uvicorn's loggers
    hand their records to it (`python -m service` runs uvicorn with `log_config=None`; under
    `uvicorn service.main:app` its handlers, set before this module loads, are removed here), and
    uvicorn's access log is dropped: RequestContextMiddleware writes ours."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").addFilter(_DropAll())
