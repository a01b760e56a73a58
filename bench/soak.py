"""`python -m bench soak`: the service under steady load for a long time (not run by CI).

    python -m bench soak [--minutes 30] [--clients 32] [--model-dir DIR] [--backend litert-int8]

`--clients` clients each send one /generate request (one prompt of the benchmark's mixed set,
`--max-tokens` tokens, sampled) after another, for `--warmup-minutes` (not counted: caches,
thread pools and the allocator reach their working size) and then `--minutes`. It reports the
server's resident memory (VmRSS) when the counted part starts and when it ends, and the drift
between them; every error (anything but a 200, or a 503 the client retries after Retry-After);
and requests and tokens per minute. Bars: drift under 5%, no error. JSON and Markdown go to
bench/results/<stamp>-soak/ (and soak-latest.*), with a plot of RSS over time (soak-rss.svg).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import config, plots, report
from bench.cli import DEFAULT_CACHE, DEFAULT_RESULTS, ensure_litert, ensure_model, log, parse_env, service_revision
from bench.client import RequestOutcome, send
from bench.server import Service, parse_metrics

DRIFT_BAR_PERCENT = 5.0
TOKENS_METRIC = "llm_generated_tokens_total"


@dataclass
class SoakLog:
    """What the clients and the sampler saw, in seconds since the counted part began (negative
    during the warm-up)."""

    rss: list[tuple[float, float]] = field(default_factory=list)  # (t, MiB)
    tokens: list[tuple[float, float]] = field(default_factory=list)  # (t, generated tokens so far)
    completed: list[float] = field(default_factory=list)  # t of each 200
    errors: list[tuple[float, str]] = field(default_factory=list)
    rejected_503: int = 0


def summarize(soak: SoakLog, minutes: float, minute: float = 60.0) -> dict:
    """The report's figures: RSS at the counted part's start and end (the samples nearest to
    0 and to its end), drift, errors, and per-minute throughput of the counted part."""
    end = minutes * minute
    counted = [(t, mib) for t, mib in soak.rss if 0 <= t <= end + minute / 6]
    if not counted:
        raise ValueError("no memory sample in the counted part")
    start_mib, end_mib = counted[0][1], counted[-1][1]
    buckets = max(1, math.ceil(minutes - 1e-9))
    per_minute = []
    for i in range(buckets):
        lo, hi = i * minute, min((i + 1) * minute, end)
        done = sum(lo <= t < hi for t in soak.completed)
        tokens = _delta(soak.tokens, lo, hi)
        scale = minute / (hi - lo) if hi > lo else 0
        per_minute.append({"minute": i + 1, "requests": done, "requests_per_minute": done * scale,
                           "tokens_per_minute": tokens * scale if tokens is not None else None})
    counted_errors = [(t, e) for t, e in soak.errors if t >= 0]
    rates = [m["requests_per_minute"] for m in per_minute]
    drift = (end_mib - start_mib) / start_mib * 100
    return {
        "rss_start_mib": start_mib,
        "rss_end_mib": end_mib,
        "rss_max_mib": max(mib for _, mib in counted),
        "rss_drift_percent": drift,
        "requests": sum(m["requests"] for m in per_minute),
        "errors": len(counted_errors),
        "errors_in_warmup": len(soak.errors) - len(counted_errors),
        "first_errors": [e for _, e in counted_errors[:5]],
        "rejected_503": soak.rejected_503,
        "per_minute": per_minute,
        "requests_per_minute_min": min(rates),
        "requests_per_minute_max": max(rates),
        "bars": [
            {"name": "RSS drift", "value": drift, "target": f"< {DRIFT_BAR_PERCENT:g}%",
             "holds": abs(drift) < DRIFT_BAR_PERCENT},
            {"name": "errors", "value": len(counted_errors), "target": "0", "holds": not counted_errors},
        ],
    }


def _delta(samples: list[tuple[float, float]], lo: float, hi: float) -> float | None:
    """The growth of a counter between times lo and hi, interpolated between its samples."""
    a, b = _at(samples, lo), _at(samples, hi)
    return None if a is None or b is None else b - a


def _at(samples: list[tuple[float, float]], x: float) -> float | None:
    for (t0, v0), (t1, v1) in zip(samples, samples[1:]):
        if t0 <= x <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (x - t0) / (t1 - t0)
    return None


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [
        f"# Soak: {result['clients']} clients for {result['minutes']:g} minutes ({result['backend']})",
        "",
        f"Command: `{result.get('command', './bench/run.sh soak')}`. "
        f"Started {result['started_at']}; model {result['model_dir']}; {result['max_tokens']} tokens a request, "
        f"temperature {result['temperature']}; warm-up {result['warmup_minutes']:g} min (not counted); "
        f"revision {result['revision'].get('commit', '?')}; load average before {result['load_before']}.",
        "",
        "| Bar | Value | Target | Holds |",
        "| --- | --- | --- | --- |",
    ]
    for bar in s["bars"]:
        value = f"{bar['value']:+.2f}%" if bar["name"] == "RSS drift" else str(bar["value"])
        lines.append(f"| {bar['name']} | {value} | {bar['target']} | {'yes' if bar['holds'] else 'no'} |")
    lines += [
        "",
        f"RSS: {s['rss_start_mib']:.1f} MiB at the start (after warm-up), {s['rss_end_mib']:.1f} MiB at the end, "
        f"{s['rss_max_mib']:.1f} MiB at most. Requests: {s['requests']} answered, {s['errors']} errors "
        f"({s['errors_in_warmup']} during warm-up), {s['rejected_503']} 503s retried after Retry-After.",
        "",
        "| Minute | Requests | Requests/min | Tokens/min |",
        "| --- | --- | --- | --- |",
    ]
    for m in s["per_minute"]:
        tokens = f"{m['tokens_per_minute']:.0f}" if m["tokens_per_minute"] is not None else "n/a"
        lines.append(f"| {m['minute']} | {m['requests']} | {m['requests_per_minute']:.1f} | {tokens} |")
    if s["first_errors"]:
        lines += ["", "First errors:", ""] + [f"- `{e}`" for e in s["first_errors"]]
    lines += report.plot_links(result)
    return "\n".join(lines) + "\n"


async def drive(svc: Service, clients: int, bodies: list[dict], warmup: float, counted: float,
                sample_every: float) -> SoakLog:
    """`clients` closed-loop clients for warmup + counted seconds; samples RSS and the token
    counter every `sample_every` seconds (and at the counted part's start and end)."""
    soak = SoakLog()
    zero = time.monotonic() + warmup
    stop_at = zero + counted
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def one_client(client: httpx.AsyncClient, k: int) -> None:
        i = k
        while time.monotonic() < stop_at:
            outcome = RequestOutcome(prompt=bodies[i % len(bodies)]["prompts"][0])
            await send(client, bodies[i % len(bodies)], outcome)
            now = time.monotonic() - zero
            soak.rejected_503 += outcome.rejected_503
            if outcome.error:
                soak.errors.append((now, outcome.error))
                await asyncio.sleep(1)  # a broken server is not hammered
            else:
                soak.completed.append(now)
            i += clients

    async def sample(client: httpx.AsyncClient) -> None:
        memory = await asyncio.to_thread(svc.memory)
        now = time.monotonic() - zero
        soak.rss.append((now, memory["vmrss_mib"]))
        try:
            metrics = parse_metrics((await client.get("/metrics")).text)
            if TOKENS_METRIC in metrics:
                soak.tokens.append((now, metrics[TOKENS_METRIC]))
        except httpx.HTTPError:
            pass

    async def sampler(client: httpx.AsyncClient) -> None:
        marks = [zero, stop_at]
        next_at = time.monotonic()
        while time.monotonic() < stop_at:
            wake = min([next_at] + [m for m in marks if m > time.monotonic()])
            await asyncio.sleep(max(0.0, wake - time.monotonic()))
            await sample(client)
            if time.monotonic() >= next_at:
                next_at += sample_every

    async with httpx.AsyncClient(base_url=svc.base_url, timeout=300, limits=limits) as client, \
            httpx.AsyncClient(base_url=svc.base_url, timeout=30) as probe:
        await asyncio.gather(sampler(probe), *(one_client(client, k) for k in range(clients)))
        await sample(probe)  # after the last answers
    return soak


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0, help="counted minutes of load (default 30)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--warmup-minutes", type=float, default=2.0, help="load before the start RSS is taken (default 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens a request (default 64, as the full preset)")
    p.add_argument("--backend", default="litert-int8", choices=sorted(config.BACKENDS),
                   help="service configuration (default litert-int8)")
    p.add_argument("--model-dir", type=Path, help="model to serve (default: the random-weight DistilGPT2-shaped "
                   "model in the cache, made if absent)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--sample-seconds", type=float, default=10.0, help="memory sampling interval (default 10)")
    p.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the service (repeatable)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a bar does not hold")
    p.add_argument("--publish", type=Path, metavar="DIR", help="also copy the result (as soak.md and soak.json) and "
                   "its plot to DIR, e.g. docs/benchmark")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.minutes <= 0 or args.clients < 1 or args.warmup_minutes < 0:
        raise SystemExit("--minutes must be > 0, --clients >= 1, --warmup-minutes >= 0")
    backend = config.BACKENDS[args.backend]
    started_at = time.strftime("%Y-%m-%d %H:%M:%S")
    work = args.results_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-soak"
    work.mkdir(parents=True, exist_ok=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    revision = service_revision()
    command = "./bench/run.sh soak" + "".join(f" {a}" for a in (sys.argv[2:] if argv is None else argv))
    model_dir = ensure_model(args.model_dir, "distilgpt2", args.cache_dir).resolve()
    if backend.backend == "litert":
        ensure_litert(model_dir, work)
    env = {**parse_env(args.service_env), **backend.env}
    bodies = [{"prompts": [p], "max_tokens": args.max_tokens, "temperature": config.SAMPLING_TEMPERATURE}
              for p in config.MIXED_PROMPTS]
    with Service(model_dir, work / "service.log", env) as svc:
        log(f"soak: {svc.health} after {svc.warmup_seconds:.1f} s; {args.clients} clients, "
            f"{args.warmup_minutes:g} min warm-up then {args.minutes:g} min")
        soak = asyncio.run(drive(svc, args.clients, bodies, args.warmup_minutes * 60, args.minutes * 60,
                                 args.sample_seconds))
    summary = summarize(soak, args.minutes)
    result = {
        "kind": "soak", "command": command, "started_at": started_at, "backend": args.backend, "model_dir": str(model_dir),
        "clients": args.clients, "minutes": args.minutes, "warmup_minutes": args.warmup_minutes,
        "max_tokens": args.max_tokens, "temperature": config.SAMPLING_TEMPERATURE, "env": env,
        "machine": report.machine_facts(), "revision": revision, "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()], "summary": summary,
        "samples": {"rss_mib": soak.rss, "generated_tokens": soak.tokens},
    }
    result["plots"] = plots.draw(result, work, log)
    md = markdown(result)
    report.save(result, md, work, args.results_dir, "soak-latest")
    if args.publish:
        report.save(result, md, work, args.publish, "soak")
    print(md, flush=True)
    log(f"wrote {work / 'result.json'}, {work / 'result.md'} and {', '.join(result['plots']) or 'no plots'}")
    if args.strict and not all(bar["holds"] for bar in summary["bars"]):
        return 1
    return 0
