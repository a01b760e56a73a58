"""Graceful shutdown for `python -m service`: drain on SIGTERM, then let uvicorn shut down.

uvicorn's own handling of SIGTERM closes the listening socket at once and then waits for open
connections, so a request arriving during the drain is refused at the TCP level; afterwards it
re-raises the signal, so the process ends with status 143 (`Server.shutdown` and
`Server.capture_signals` in https://github.com/encode/uvicorn/blob/0.54.0/uvicorn/server.py). Here the first signal starts a drain instead:
the server keeps listening and answers new work 503 with Retry-After, while the accepted work
finishes within SHUTDOWN_GRACE_SECONDS; then uvicorn shuts down as usual and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)

# Responses still being written once the work is done (slow readers) get this long.
CLOSE_CONNECTIONS_SECONDS = 5


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining the app's runtime (app.state.runtime) before it shuts down.

    - First SIGTERM or SIGINT: the runtime refuses new work (503 + Retry-After; /health says
      "draining"), running and queued prompts finish within the grace period, the rest then get
      503; then uvicorn closes the listener, finishes writing responses and runs the app's
      shutdown. Exit status 0.
    - Second signal: what is left gets 503 at once, and the server shuts down.
    - Third: uvicorn's forced exit (no waiting for connections or the app's shutdown).
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self._app = app
        self._signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes of the event loop's own code: only hand
        # the work to the loop. Not recorded in _captured_signals: uvicorn would re-raise it.
        self._signals += 1
        log.info("received %s (%d)", signal.Signals(sig).name, self._signals)
        if self._loop is None:
            self.should_exit = True
        elif self._signals == 1:
            self._loop.call_soon_threadsafe(self._start_drain)
        elif self._signals == 2:
            self._loop.call_soon_threadsafe(self._abort)
        else:
            self.should_exit = self.force_exit = True

    def _start_drain(self) -> None:
        self._drain = self._loop.create_task(self._drain_then_exit(), name="drain")

    async def _drain_then_exit(self) -> None:
        runtime = getattr(self._app.state, "runtime", None)
        try:
            if runtime is not None:
                await runtime.drain()
        finally:
            self.should_exit = True

    def _abort(self) -> None:
        runtime = getattr(self._app.state, "runtime", None)
        if runtime is not None:
            runtime.abort()
        self.should_exit = True


def serve(app: FastAPI, host: str, port: int, log_level: str, log_config: dict | None = None) -> int:
    """Run `app` until a signal stops it; the exit status (0, or uvicorn's 3 when the app's
    start-up failed)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, log_config=log_config,
                            timeout_graceful_shutdown=CLOSE_CONNECTIONS_SECONDS)
    server = DrainingServer(config, app)
    server.run()
    return 0 if server.started else 3
