"""The HTTP routes: each reads like its contract; errors are mapped in service/errors.py.

No `from __future__ import annotations` here: FastAPI must see the request model itself, and
it is a class built from the settings inside `create_router`.
"""


import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service import observability
from service.config import Settings
from service.engine import GenerationRow, OverMemoryBudget, PromptTooLong
from service.errors import PromptsTooLong
from service.runtime import Runtime
from service.schemas import (STREAM_DESCRIPTION, ErrorMessage, GenerateResponse, HealthResponse, event_stream,
                             generate_request_model)
from service.security import bearer_scheme
from service.detokenize import first_stop
from service.streaming import generate_events, results_unless_disconnected


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again", "schema": {"type": "integer"}}}
UNAUTHORIZED = {"description": "No API key, or not one of the server's (only when API_KEY or API_KEY_FILE is set)",
                "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}}


class KeyDocs:
    """What a route declares about the API key in the OpenAPI document, when keys are configured
    and the route needs one (service/security.py checks it, before the route runs): the bearer
    scheme, and the 401 with its body."""

    def __init__(self, settings: Settings, needed: bool = True, error_body: type = ErrorMessage):
        on = bool(settings.api_keys) and needed
        self.dependencies = [Security(bearer_scheme)] if on else []
        self.responses = {401: UNAUTHORIZED | {"model": error_body}} if on else {}


def check_total_tokens(settings: Settings, requested: int, rows: int, max_tokens: int) -> str | None:
    """Why a request asking for `rows` x `max_tokens` new tokens is over MAX_TOTAL_TOKENS, or None."""
    if requested <= settings.max_total_tokens:
        return None
    return (f"this request asks for {requested} new tokens ({rows} rows x max_tokens {max_tokens}), over this "
            f"server's limit of {settings.max_total_tokens} (MAX_TOTAL_TOKENS)")


def create_router(settings: Settings) -> APIRouter:
    router = APIRouter()
    GenerateRequest = generate_request_model(settings)

    generate_key, metrics_key = KeyDocs(settings), KeyDocs(settings, settings.metrics_require_key)

    @router.get("/health", response_model=HealthResponse,
                responses={503: {"model": HealthResponse, "description": "Loading, or warm-up failed"}})
    async def health(runtime: RuntimeDep):
        """200 {"status": "ok", ...} once the model is warmed up and the scheduler runs; else 503.

        `backend` and `precision` say what serves."""
        body = {"status": "ok" if runtime.ready else runtime.status}
        if runtime.engine is not None:
            body |= {"backend": runtime.engine.backend, "precision": runtime.engine.precision}
        return JSONResponse(body, status_code=200 if runtime.ready else 503)

    @router.post("/generate", response_model=GenerateResponse,
                 dependencies=generate_key.dependencies,
                 responses={200: {"content": event_stream("A JSON object of the stream, or `[DONE]`. " + STREAM_DESCRIPTION),
                                  "description": "The results; with `stream`, server-sent events. " + STREAM_DESCRIPTION},
                            **generate_key.responses,
                            413: {"model": ErrorMessage, "description": "The body is over MAX_BODY_BYTES"},
                            422: {"description": "Invalid request (also a body that is not JSON), a prompt too long "
                                  "for the context window, a prompt whose key/value memory at max_tokens could "
                                  "never fit the server's memory budget, or more new tokens than MAX_TOTAL_TOKENS"},
                            499: {"description": "Not sent: the client went away first (what the access log and "
                                  "the metrics record)"},
                            500: {"model": ErrorMessage, "description": "Generation failed"},
                            503: {"model": ErrorMessage, "headers": RETRY_AFTER,
                                  "description": "Model loading, queue full or shutting down (see Retry-After)"}})
    async def generate(body: GenerateRequest, runtime: RuntimeDep, http: Request):
        """Continue each prompt. Prompts from concurrent requests share the running batch: they
        join it between decode calls and leave it as soon as they finish."""
        prompts = [body.prompts] if isinstance(body.prompts, str) else body.prompts
        over = check_total_tokens(settings, len(prompts) * body.max_tokens, len(prompts), body.max_tokens)
        if over:
            raise RequestValidationError([{"type": "too_many_tokens", "loc": ("body", "max_tokens"), "msg": over,
                                           "input": body.max_tokens, "ctx": {"limit": settings.max_total_tokens}}])
        engine, scheduler = runtime.ready_engine()
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        rows, too_long = [], []
        for i, prompt in enumerate(prompts):
            ids = engine.encode(prompt)
            try:
                engine.check_fits(i, ids, body.max_tokens)
            except (PromptTooLong, OverMemoryBudget) as problem:
                too_long.append(problem)
            rows.append(GenerationRow(tuple(ids), body.max_tokens, body.temperature, seed, i, top_k=body.top_k,
                                      top_p=body.top_p, repetition_penalty=body.repetition_penalty))
        if too_long:
            raise PromptsTooLong(too_long)
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        request = scheduler.submit(rows, stream=body.stream, interval=settings.stream_interval_ms / 1000, stops=stops)
        observability.attach(request)
        runtime.metrics.requests.inc()
        runtime.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in rows))
        if body.stream:
            events = generate_events(request, engine.decode, [len(r.prompt_ids) for r in rows], stops,
                                     on_tokens=runtime.metrics.generated_tokens.inc,
                                     byte_ids=engine.byte_fallback_ids)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            outputs = await results_unless_disconnected(request, http)
        finally:
            request.cancel()  # rows still running after an error leave the batch
        if outputs is None:  # the client is gone: nobody reads this
            return Response(status_code=499)
        runtime.metrics.generated_tokens.inc(sum(len(o) for o in outputs))
        texts = [engine.decode(o) for o in outputs]
        return GenerateResponse(results=[text[:first_stop(text, stops)] for text in texts])

    @router.get("/metrics", response_class=Response, dependencies=metrics_key.dependencies,
                responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
                           **metrics_key.responses})
    async def prometheus_metrics(runtime: RuntimeDep) -> Response:
        """Prometheus metrics (text format): requests, tokens, queue, batch sizes, and histograms of
        queue wait, time to first token and time per output token."""
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router
