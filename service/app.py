"""The app factory: settings in, a FastAPI app out, with its lifespan."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.config import Settings
from service.errors import register_error_handlers
from service.routes import create_router
from service.runtime import EngineFactory, Runtime, configured_engine
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
    return app


class _QuietHealthChecks(logging.Filter):
    """Docker's healthcheck asks /health every few seconds; successful answers are not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (len(args) == 5 and args[2] == "/health" and args[4] == 200)


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # uvicorn's access log records carry (client, method, path, http version, status).
    logging.getLogger("uvicorn.access").addFilter(_QuietHealthChecks())
