"""GET /metrics: Prometheus metrics through prometheus-client, one registry per app, every name
in the `llm_` namespace.

Histograms of what users feel (queue wait, time to first token, time per output token) are
fed by the scheduler's hooks; HTTP requests by route and status and their latency by
service/observability.py's middleware; the runtime's state (ready, queue, warm-up) is read when
scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from service.scheduler import SchedulerStats

disable_created_metrics()  # no `_created` series beside every counter and histogram

# Seconds: a few ms (a token at batch 1) to a minute (a long queue).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1)


class Metrics:
    """The app's metrics; `render()` is the body of GET /metrics."""

    def __init__(self, runtime):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("llm_requests", "Generate requests accepted (queued for generation).", registry=r)
        self.http_requests = Counter("llm_http_requests", "HTTP requests answered, by method, route and status.",
                                     ["method", "route", "status"], registry=r)
        self.http_request_duration = Histogram(
            "llm_http_request_duration_seconds", "Seconds from a request's arrival to the end of its answer "
            "(a stream's last event).", ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens of accepted requests (each prompt once).",
                                     registry=r)
        self.generated_tokens = Counter("llm_generated_tokens", "New tokens generated.", registry=r)
        self.queue_wait = Histogram("llm_queue_wait_seconds", "Seconds a prompt waited before joining the batch.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram(
            "llm_time_to_first_token_seconds", "Seconds from a prompt's arrival to its first new token.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "llm_time_per_output_token_seconds", "Mean seconds between a prompt's new tokens after the first.",
            buckets=TOKEN_BUCKETS, registry=r)
        self.batch_rows = Histogram("llm_batch_rows", "Rows in the batch at each decode call.",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), registry=r)
        self.rows_cancelled = Counter("llm_rows_cancelled",
                                      "Prompts dropped because their client went away (waiting or running).", registry=r)
        r.register(_RuntimeState(runtime))

    def scheduler_stats(self) -> SchedulerStats:
        return SchedulerStats(
            queue_wait=self.queue_wait.observe,
            time_to_first_token=self.time_to_first_token.observe,
            time_per_output_token=self.time_per_output_token.observe,
            batch_size=self.batch_rows.observe,
            rows_cancelled=self.rows_cancelled.inc,
        )

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_request_duration.labels(method, route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RuntimeState:
    """The runtime's gauges, read at each scrape."""

    def __init__(self, runtime):
        self._runtime = runtime

    def collect(self):
        runtime = self._runtime
        engine, scheduler = runtime.engine, runtime.scheduler
        yield GaugeMetricFamily("llm_ready", "1 when the model is warmed up and the scheduler runs.", int(runtime.ready))
        yield GaugeMetricFamily("llm_warmup_seconds", "Seconds from start to ready.", runtime.warmup_seconds or 0)
        yield GaugeMetricFamily("llm_queue_prompts", "Prompts waiting to join the batch.",
                                scheduler.queued if scheduler else 0)
        yield GaugeMetricFamily("llm_running_prompts", "Prompts in the batch being decoded.",
                                scheduler.running if scheduler else 0)
        yield CounterMetricFamily("llm_decode_calls", "Decode calls run (each one or more tokens a row).",
                                  scheduler.decode_calls if scheduler else 0)
        yield CounterMetricFamily("llm_short_lane_rows", "Short prompts that also got decode calls of their own "
                                  "beside long running rows (LiteRT's short lane).", engine.lane_rows if engine else 0)
        yield CounterMetricFamily("llm_short_lane_calls", "Decode calls of the short lane (also in llm_decode_calls).",
                                  engine.lane_calls if engine else 0)
        yield CounterMetricFamily("llm_compiles_after_warmup", "Programs compiled after warm-up (should be 0).",
                                  engine.compiles_after_warmup() if engine else 0)
        yield GaugeMetricFamily("llm_memory_limit_bytes", "The memory limit the key/value budget is taken from "
                                "(MEMORY_LIMIT, else the cgroup's); 0: none.", runtime.memory_limit or 0)
        yield GaugeMetricFamily("llm_kv_budget_bytes", "Bytes the batches' key/value memory may take: the limit less "
                                "the resident memory after warm-up less a margin; 0: no budget.",
                                (engine.memory_budget or 0) if engine else 0)
        yield GaugeMetricFamily("llm_kv_slots_used", "Key/value slots the running rows fill now.",
                                engine.kv_slots_used() if engine else 0)
        yield GaugeMetricFamily("llm_kv_bytes_reserved", "Bytes of the key/value memory the running batch holds now "
                                "(LiteRT: its pool); 0 when idle.", engine.kv_bytes_reserved() if engine else 0)
        yield GaugeMetricFamily("llm_kv_bytes_admitted", "The running rows' worst case (engine batch_bytes) that "
                                "admission holds against llm_kv_budget_bytes; 0 when idle.",
                                scheduler.admitted_bytes if scheduler else 0)
        if engine is not None:
            # An info metric: Prometheus shows it as llm_backend_info{backend=...,precision=...} 1.
            yield InfoMetricFamily("llm_backend", "What serves: the backend and the precision of its weights.",
                                   value={"backend": engine.backend, "precision": engine.precision})
