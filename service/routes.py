"""The HTTP routes: each reads like its contract; errors are mapped in service/errors.py.

No `from __future__ import annotations` here: FastAPI must see the request model itself, and
it is a class built from the settings inside `create_router`.
"""


import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.config import Settings
from service.engine import GenerationRow, PromptTooLong
from service.errors import PromptsTooLong
from service.runtime import Runtime
from service.schemas import STREAM_DESCRIPTION, GenerateResponse, HealthResponse, generate_request_model
from service.detokenize import first_stop
from service.streaming import generate_events, results_unless_disconnected


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def create_router(settings: Settings) -> APIRouter:
    router = APIRouter()
    GenerateRequest = generate_request_model(settings)

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
                 responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                                  "description": "The results; with `stream`, server-sent events. " + STREAM_DESCRIPTION},
                            422: {"description": "Invalid request, or a prompt too long for the context window"},
                            500: {"description": "Generation failed"},
                            503: {"description": "Model loading, queue full or shutting down (see Retry-After)"}})
    async def generate(body: GenerateRequest, runtime: RuntimeDep, http: Request):
        """Continue each prompt. Prompts from concurrent requests share the running batch: they
        join it between decode calls and leave it as soon as they finish."""
        engine, scheduler = runtime.ready_engine()
        prompts = [body.prompts] if isinstance(body.prompts, str) else body.prompts
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        rows, too_long = [], []
        for i, prompt in enumerate(prompts):
            ids = engine.encode(prompt)
            try:
                engine.check_fits(i, ids, body.max_tokens)
            except PromptTooLong as problem:
                too_long.append(problem)
            rows.append(GenerationRow(tuple(ids), body.max_tokens, body.temperature, seed, i, top_k=body.top_k,
                                      top_p=body.top_p, repetition_penalty=body.repetition_penalty))
        if too_long:
            raise PromptsTooLong(too_long)
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        request = scheduler.submit(rows, stream=body.stream, interval=settings.stream_interval_ms / 1000, stops=stops)
        runtime.metrics.requests.inc()
        if body.stream:
            events = generate_events(request, engine.decode, [len(r.prompt_ids) for r in rows], stops,
                                     on_tokens=runtime.metrics.generated_tokens.inc)
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

    @router.get("/metrics", response_class=Response,
                responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    async def prometheus_metrics(runtime: RuntimeDep) -> Response:
        """Prometheus metrics (text format): requests, tokens, queue, batch sizes, and histograms of
        queue wait, time to first token and time per output token."""
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router
