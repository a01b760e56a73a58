"""GET /metrics in Prometheus' text format: a handful of gauges and counters worth watching."""

from __future__ import annotations

from service.runtime import Runtime


def render(runtime: Runtime) -> str:
    engine, batcher = runtime.engine, runtime.batcher
    samples = [
        ("llm_ready", "gauge", "1 when the model is warmed up and the batch worker runs.", int(runtime.ready)),
        ("llm_warmup_seconds", "gauge", "Seconds from start to ready.", runtime.warmup_seconds or 0),
        ("llm_requests_total", "counter", "Generate requests answered with 200.", runtime.requests),
        ("llm_generated_tokens_total", "counter", "New tokens generated.", runtime.generated_tokens),
        ("llm_batches_total", "counter", "Batches run.", batcher.batches_run if batcher else 0),
        ("llm_queue_prompts", "gauge", "Prompts waiting for a batch.", batcher.queued if batcher else 0),
        ("llm_compiles_after_warmup_total", "counter", "Programs compiled after warm-up (should be 0).",
         engine.compiles_after_warmup() if engine else 0),
    ]
    lines = []
    for name, kind, help_text, value in samples:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    if engine is not None:
        lines += ["# HELP llm_backend_info What serves: the backend and the precision of its weights.",
                  "# TYPE llm_backend_info gauge",
                  f'llm_backend_info{{backend="{engine.backend}",precision="{engine.precision}"}} 1']
    return "\n".join(lines) + "\n"
