"""The app factory: settings in, a FastAPI app out, with its lifespan."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

from service.config import Settings
from service.errors import register_error_handlers
from service.limits import BodySizeLimit
from service.observability import RequestContextMiddleware, configure_logging  # noqa: F401 (main's)
from service.routes import create_router
from service.runtime import EngineFactory, Runtime, configured_engine
from service.security import APIKeyMiddleware, open_paths
from service.v1.routes import create_v1_router


def create_app(settings: Settings, engine_factory: EngineFactory = configured_engine) -> FastAPI:
    """Build the app. Nothing is loaded until the lifespan starts (as the server starts)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runtime = Runtime(settings, engine_factory)
        app.state.runtime = runtime
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="Local LLM API",
        summary="Text generation with a GPT-2-family model on the CPU, with TensorFlow Lite (LiteRT) or TensorFlow and XLA.",
        version="0.1.0",
        lifespan=lifespan,
    )
    register_error_handlers(app)
    app.include_router(create_router(settings))
    app.include_router(create_v1_router(settings))
    # The last added runs first: the request's id and access line around everything (401s and
    # 413s included), CORS (a browser's preflight needs no key), the key, then the body cap.
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    if settings.api_keys:
        app.add_middleware(APIKeyMiddleware, keys=settings.api_keys,
                           open_paths=open_paths(settings.metrics_require_key))
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "Retry-After"], max_age=600)
    app.add_middleware(RequestContextMiddleware)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, without the 422 it lists for every route with a body: /v1 answers
    invalid requests 400, in OpenAI's envelope."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for path, operations in schema["paths"].items():
            if path.startswith("/v1/"):
                for operation in operations.values():
                    operation["responses"].pop("422", None)
        app.openapi_schema = schema
    return app.openapi_schema
