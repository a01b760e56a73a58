"""What the app runs: the engine, its scheduler and their state, from start-up to shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import anyio

from service import memory
from service.chat_template import ChatTemplate, load_chat_template
from service.config import Settings
from service.engine import Engine
from service.engine.base import GenerationRow
from service.errors import ModelNotReady
from service.metrics import Metrics
from service.model_files import verify_manifest
from service.scheduler import Scheduler, SchedulerStopped

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], Engine]


def configured_engine(settings: Settings) -> Engine:
    """The backend the settings choose (BACKEND, with auto resolved against the model directory)."""
    return {"litert": litert_engine, "tf": tensorflow_engine}[settings.serving_backend](settings)


def litert_engine(settings: Settings) -> Engine:
    """TensorFlow Lite's runtime on the converted files; imports no TensorFlow."""
    from service.engine.litert_gpt2 import LiteRTGPT2Engine

    return LiteRTGPT2Engine(settings.model_dir, precision=settings.litert_precision,
                            max_batch_size=settings.max_batch_size, num_threads=settings.num_threads,
                            smallest_cache=settings.min_cache_size, short_lane=settings.short_lane,
                            max_context=settings.context_tokens)


def tensorflow_engine(settings: Settings) -> Engine:
    """TensorFlow with XLA (imported here, so that importing the app imports no TensorFlow)."""
    from service.engine.tf_gpt2 import TFGPT2Engine, use_persistent_compile_cache

    if settings.xla_cache_dir is not None:
        use_persistent_compile_cache(settings.xla_cache_dir)
    return TFGPT2Engine(settings.model_dir, max_batch_size=settings.max_batch_size,
                        prefill_chunk=settings.prefill_chunk, decode_chunk=settings.decode_chunk,
                        smallest_cache=settings.min_cache_size)


class Runtime:
    """Loads the engine, warms it up in the background, and serves batches until stopped.

    `status` is "loading" until warm-up has compiled every shape and the scheduler runs, then
    "ok"; "failed" if warm-up raised; "draining" once `drain()` has begun (new work is refused
    with 503, what was accepted finishes). Loading the weights happens before the server accepts
    connections, so a broken model directory stops the server at start.
    """

    def __init__(self, settings: Settings, engine_factory: EngineFactory):
        self.settings = settings
        self._engine_factory = engine_factory
        self.engine: Engine | None = None
        self.chat_template: ChatTemplate | None = None  # the model directory's, if it has one
        self.scheduler: Scheduler | None = None
        self.status = "loading"
        self.warmup_seconds: float | None = None
        self.memory_limit: int | None = None  # bytes; set after warm-up (MEMORY_LIMIT, else the cgroup's)
        self.metrics = Metrics(self)
        self._warmup_task: asyncio.Task | None = None

    async def start(self) -> None:
        started = time.monotonic()
        # Settings checked the files' sizes; the sums of the files the backend reads (every byte
        # read) are checked once, here, unless load_settings did already (it exits with one line
        # when they do not match).
        if not self.settings.manifest_verified:
            await anyio.to_thread.run_sync(verify_manifest, self.settings.model_dir, self.settings.unread_files)
        self.engine = await anyio.to_thread.run_sync(self._engine_factory, self.settings)
        self.chat_template = await anyio.to_thread.run_sync(load_chat_template, self.settings.model_dir)
        log.info("model loaded from %s in %.1f s: backend %s, precision %s, %s", self.settings.model_dir,
                 time.monotonic() - started, self.engine.backend, self.engine.precision,
                 "a chat template" if self.chat_template else "no chat template (/v1/chat/completions answers 400)")
        self._warmup_task = asyncio.create_task(self._warm_up(started), name="warmup")

    async def _warm_up(self, started: float) -> None:
        try:
            await anyio.to_thread.run_sync(self.engine.warmup)
        except Exception:
            self.status = "failed"
            log.exception("warm-up failed; /health reports failed")
            return
        if self.status == "draining":  # stopped while warming up: nothing to serve
            return
        # Before the scheduler exists: it admits rows by the budget from its first one.
        self._budget_memory()
        self.scheduler = Scheduler(
            self.engine,
            max_batch_size=self.settings.max_batch_size,
            batch_timeout=self.settings.batch_timeout_ms / 1000,
            max_queue_size=self.settings.max_queue_size,
            max_queue_wait=self.settings.max_queue_wait_seconds or None,
            stats=self.metrics.scheduler_stats(),
        )
        self.scheduler.start()
        self.warmup_seconds = time.monotonic() - started
        self.status = "ok"
        log.info("ready: warm-up took %.1f s since start", self.warmup_seconds)

    def _budget_memory(self) -> None:
        """Give the engine its key/value budget: the limit less what the process holds once warm
        (every buffer but the batches' has been touched by then) less a margin; log it once."""
        engine, MiB = self.engine, 2**20
        limit, source = memory.effective_limit(self.settings.memory_limit)
        try:
            baseline = memory.resident_bytes() + engine.prompt_reserve_bytes
        except (OSError, ValueError) as exc:  # no /proc (not Linux): nothing to measure against
            log.warning("memory: cannot read the resident memory (%s): no key/value budget", exc)
            limit = None
        if limit is None:
            log.info("memory: no limit (MEMORY_LIMIT unset and no cgroup limit): no key/value budget, rows are "
                     "admitted by count only (MAX_BATCH_SIZE)")
            engine.set_memory_budget(None)
            return
        self.memory_limit = limit
        budget = memory.budget(limit, baseline)
        engine.set_memory_budget(budget)
        full = GenerationRow((0,), engine.context_window - 1)  # only lengths count
        rows = sum(1 for k in range(1, engine.max_batch_size + 1) if engine.batch_bytes([full] * k) <= budget)
        log.info("memory: limit %.0f MiB (from %s), %.0f MiB resident after warm-up, %.0f MiB margin: %.0f MiB for "
                 "key/value memory, about %d full-window row(s) at once (of MAX_BATCH_SIZE=%d)", limit / MiB, source,
                 baseline / MiB, memory.margin(limit) / MiB, budget / MiB, rows, engine.max_batch_size)
        if rows == 0:
            log.warning("memory: one row filling the %d-token window needs %.0f MiB, more than the %.0f MiB budget: "
                        "the largest requests will be refused (4xx); raise the memory limit or serve a smaller "
                        "precision", engine.context_window, engine.batch_bytes([full]) / MiB, budget / MiB)

    @property
    def ready(self) -> bool:
        return self.status == "ok" and self.scheduler is not None and self.scheduler.alive

    def ready_engine(self) -> tuple[Engine, Scheduler]:
        if self.status == "draining":
            raise SchedulerStopped("the server is shutting down; retry later")
        if not self.ready:
            raise ModelNotReady("the model is not ready: it is still loading" if self.status == "loading"
                                else f"the model is not ready (status {self.status})")
        return self.engine, self.scheduler

    async def drain(self) -> bool:
        """Refuse new work (503, /health "draining"), and let the running and queued prompts
        finish within SHUTDOWN_GRACE_SECONDS; the ones left then get 503. True if all finished."""
        if self.status in ("ok", "loading"):
            self.status = "draining"
        log.info("draining: %d running and %d queued prompts may take up to %g s",
                 self.scheduler.running if self.scheduler else 0, self.scheduler.queued if self.scheduler else 0,
                 self.settings.shutdown_grace_seconds)
        if self.scheduler is None:
            return True
        finished = await self.scheduler.stop(self.settings.shutdown_grace_seconds)
        log.info("drained" if finished else "stopped with work left (answered 503)")
        return finished

    def abort(self) -> None:
        """Stop at once: what is left of the accepted work gets 503."""
        if self.status in ("ok", "loading"):
            self.status = "draining"
        if self.scheduler is not None:
            self.scheduler.abort()

    async def stop(self) -> None:
        """Finish every queued prompt within the grace period, then stop (also waits out a
        running warm-up)."""
        if self._warmup_task is not None:
            await self._warmup_task
        if self.scheduler is not None:
            await self.scheduler.stop(self.settings.shutdown_grace_seconds)
