"""The HTTP routes: each reads like its contract; errors are mapped in service/errors.py.

No `from __future__ import annotations` here: FastAPI must see the request model itself, and
it is a class built from the settings inside `create_router`.
"""


import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from service import metrics
from service.config import Settings
from service.engine import GenerationRow, PromptTooLong
from service.errors import PromptsTooLong
from service.runtime import Runtime
from service.schemas import GenerateResponse, HealthResponse, generate_request_model


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def create_router(settings: Settings) -> APIRouter:
    router = APIRouter()
    GenerateRequest = generate_request_model(settings)

    @router.get("/health", response_model=HealthResponse,
                responses={503: {"model": HealthResponse, "description": "Loading, or warm-up failed"}})
    async def health(runtime: RuntimeDep):
        """200 {"status": "ok", ...} once the model is warmed up and the batch worker runs; else 503.

        `backend` and `precision` say what serves."""
        body = {"status": "ok" if runtime.ready else runtime.status}
        if runtime.engine is not None:
            body |= {"backend": runtime.engine.backend, "precision": runtime.engine.precision}
        return JSONResponse(body, status_code=200 if runtime.ready else 503)

    @router.post("/generate", response_model=GenerateResponse,
                 responses={422: {"description": "Invalid request, or a prompt too long for the context window"},
                            503: {"description": "Model loading, queue full or shutting down (see Retry-After)"}})
    async def generate(body: GenerateRequest, runtime: RuntimeDep) -> GenerateResponse:
        """Continue each prompt; prompts from concurrent requests are decoded together in batches."""
        engine, batcher = runtime.ready_engine()
        prompts = [body.prompts] if isinstance(body.prompts, str) else body.prompts
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        rows, too_long = [], []
        for i, prompt in enumerate(prompts):
            ids = engine.encode(prompt)
            try:
                engine.check_fits(i, ids, body.max_tokens)
            except PromptTooLong as problem:
                too_long.append(problem)
            rows.append(GenerationRow(tuple(ids), body.max_tokens, body.temperature, seed, i))
        if too_long:
            raise PromptsTooLong(too_long)
        outputs = await batcher.submit(rows)
        runtime.requests += 1
        runtime.generated_tokens += sum(len(o) for o in outputs)
        return GenerateResponse(results=[engine.decode(o) for o in outputs])

    @router.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics(runtime: RuntimeDep) -> str:
        """Counters and gauges in Prometheus' text format."""
        return metrics.render(runtime)

    return router
