"""Issue 8's scenarios: three loads of streamed /generate requests (bench/client.py reads the
stream). Every time here is client-side, from `time.perf_counter()` at the first attempt, and
every request carries one prompt.

- head of line: a short request timed on the idle server, then while long requests stream;
- uneven load: clients with think times and uneven token budgets, and the same requests in
  lockstep rounds (the two halves are measured separately, so each gets its own /metrics window);
- streaming overhead: the same request unstreamed, streamed, and unstreamed with max_tokens=1.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx

from bench.client import RequestOutcome, StreamOutcome, send, stream_request
from bench.config import HeadOfLine, StreamOverhead, UnevenLoad
from bench.load import percentile


def _client(base_url: str, connections: int, timeout: float, transport=None) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits, transport=transport)


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def _errors(outcomes) -> list[str]:
    return [o.error for o in outcomes if o.error]


def _tokens(outcomes: list[StreamOutcome]) -> int:
    return sum(o.generated_tokens or 0 for o in outcomes if o.error is None)


# ---- head of line -------------------------------------------------------------------------


async def head_of_line(base_url: str, sc: HeadOfLine, timeout: float = 900.0, transport=None) -> dict:
    """The short request's latency idle (median of `idle_repetitions`), then repeatedly while
    `long_clients` long requests stream; a short request counts as loaded when every long
    request was still streaming when it was answered."""
    short = {"prompts": [sc.short_prompt], "max_tokens": sc.short_max_tokens, "temperature": 0.0}
    longs = [{"prompts": [sc.long_prompts[i % len(sc.long_prompts)]], "max_tokens": sc.long_max_tokens,
              "temperature": 0.0} for i in range(sc.long_clients)]
    idle: list[RequestOutcome] = []
    rounds: list[dict] = []
    long_outcomes: list[StreamOutcome] = []
    async with _client(base_url, sc.long_clients + 1, timeout, transport) as client:
        for _ in range(sc.idle_repetitions):
            idle.append(RequestOutcome(prompt=sc.short_prompt))
            await send(client, short, idle[-1])
        for _ in range(sc.repetitions):
            started = time.perf_counter()
            decoding = [asyncio.Event() for _ in longs]
            tasks = [asyncio.create_task(stream_request(client, body, on_first_piece=ev.set))
                     for body, ev in zip(longs, decoding)]
            for task, ev in zip(tasks, decoding):
                task.add_done_callback(lambda _t, ev=ev: ev.set())  # a failed request decodes nothing
            await asyncio.gather(*(ev.wait() for ev in decoding))
            decoding_after = time.perf_counter() - started
            # Short requests one after another until the long ones end, so they arrive at every
            # point of the long answers (early, with a small cache, and late, with a large one).
            shorts = []
            while not any(t.done() for t in tasks):
                outcome = RequestOutcome(prompt=sc.short_prompt)
                await send(client, short, outcome)
                shorts.append((outcome, sum(not t.done() for t in tasks)))
            done = await asyncio.gather(*tasks)
            long_outcomes += done
            loaded = [o for o, streaming in shorts if streaming == sc.long_clients]
            rounds.append({"decoding_after_s": decoding_after,
                           "short_latencies_s": [o.latency for o in loaded],
                           "short_errors": [o.error for o, _ in shorts if o.error],
                           "short_requests": len(shorts), "loaded_requests": len(loaded),
                           "long_wall_s": time.perf_counter() - started, "long_tokens": _tokens(done)})
    idle_median = _median(o.latency for o in idle)
    loaded_latencies = [x for r in rounds for x in r["short_latencies_s"]]
    loaded_median = _median(loaded_latencies)
    errors = _errors(idle) + [e for r in rounds for e in r["short_errors"]] + _errors(long_outcomes)
    return {
        "name": sc.name, "role": sc.role, "long_clients": sc.long_clients, "long_max_tokens": sc.long_max_tokens,
        "short_max_tokens": sc.short_max_tokens,
        "requests": len(idle) + sum(r["short_requests"] for r in rounds) + len(rounds) * sc.long_clients,
        "idle_latencies_s": [o.latency for o in idle],
        "idle_latency_p50_s": idle_median,
        "loaded_latency_p50_s": loaded_median,
        "loaded_latency_max_s": max(loaded_latencies, default=None),
        "ratio": _ratio(loaded_median, idle_median),
        "ratio_worst": _ratio(max(loaded_latencies, default=None), idle_median),
        "rounds": rounds,
        "loaded_rounds": sum(r["loaded_requests"] > 0 for r in rounds),
        "loaded_requests": len(loaded_latencies),
        "long_tok_per_s": _ratio(sum(r["long_tokens"] for r in rounds), sum(r["long_wall_s"] for r in rounds)),
        "long_first_piece_p50_s": _median(o.first_piece for o in long_outcomes),
        "errors": len(errors), "error_samples": errors[:5],
        "responses_503": sum(o.rejected_503 for o in [*idle, *long_outcomes]),
    }


# ---- uneven load --------------------------------------------------------------------------


async def uneven_load(base_url: str, sc: UnevenLoad, lockstep: bool, timeout: float = 900.0,
                      transport=None) -> dict:
    """One half of the uneven-load comparison: `lockstep` rounds, or clients with think times."""
    workload = sc.workload()
    outcomes: list[StreamOutcome] = []
    async with _client(base_url, sc.clients, timeout, transport) as client:
        start = time.perf_counter()
        if lockstep:
            for row in workload:
                outcomes += await asyncio.gather(*(stream_request(client, body) for _, body in row))
        else:
            async def one_client(c: int) -> list[StreamOutcome]:
                mine = []
                for row in workload:
                    think, body = row[c]
                    await asyncio.sleep(think)
                    mine.append(await stream_request(client, body))
                return mine

            for mine in await asyncio.gather(*(one_client(c) for c in range(sc.clients))):
                outcomes += mine
        wall = time.perf_counter() - start
    ok = [o for o in outcomes if o.error is None]
    tokens = _tokens(outcomes)
    ttft = [o.first_piece for o in ok]
    errors = _errors(outcomes)
    return {
        "mode": "lockstep" if lockstep else "uneven",
        "clients": sc.clients, "requests": len(outcomes), "ok": len(ok),
        "wall_seconds": wall, "new_tokens": tokens,
        "max_tokens_total": sum(body["max_tokens"] for row in workload for _, body in row),
        "think_seconds_total": 0.0 if lockstep else sum(think for row in workload for think, _ in row),
        "tok_per_s": tokens / wall if wall > 0 else None,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
        "latency_p50_s": percentile([o.latency for o in ok], 50),
        "latency_p95_s": percentile([o.latency for o in ok], 95),
        "errors": len(errors), "error_samples": errors[:5],
        "responses_503": sum(o.rejected_503 for o in outcomes),
    }


# ---- streaming overhead -------------------------------------------------------------------


async def stream_overhead(base_url: str, sc: StreamOverhead, timeout: float = 900.0, transport=None) -> dict:
    """`repetitions` turns of: unstreamed, streamed, unstreamed with max_tokens=1 (interleaved,
    so a drift in the machine's speed reaches all three alike); medians of each."""
    body = {"prompts": [sc.prompt], "max_tokens": sc.max_tokens, "temperature": 0.0}
    one = {**body, "max_tokens": 1}
    plain, streamed, first = [], [], []
    async with _client(base_url, 1, timeout, transport) as client:
        for _ in range(sc.repetitions):
            plain.append(RequestOutcome(prompt=sc.prompt))
            await send(client, body, plain[-1])
            streamed.append(await stream_request(client, body))
            first.append(RequestOutcome(prompt=sc.prompt))
            await send(client, one, first[-1])
    ok = [o for o in streamed if o.error is None]
    plain_p50, streamed_p50 = _median(o.latency for o in plain), _median(o.latency for o in ok)
    one_p50, per_token = _median(o.latency for o in first), _median(o.per_token for o in ok)
    first_piece = _median(o.first_piece for o in ok)
    errors = _errors(plain) + _errors(streamed) + _errors(first)
    return {
        "name": sc.name, "role": sc.role, "max_tokens": sc.max_tokens, "repetitions": sc.repetitions,
        "requests": len(plain) + len(streamed) + len(first),
        "unstreamed_p50_s": plain_p50, "streamed_p50_s": streamed_p50,
        "ratio": _ratio(streamed_p50, plain_p50),
        "first_piece_p50_s": first_piece, "one_token_p50_s": one_p50, "per_token_p50_s": per_token,
        # The first piece may come two decode steps after what a 1-token request costs.
        "first_piece_bound_s": one_p50 + 2 * per_token if one_p50 is not None and per_token is not None else None,
        "streamed_tokens": [o.generated_tokens for o in streamed],
        "streamed_pieces": [o.pieces for o in streamed],
        "samples": {"unstreamed_s": [o.latency for o in plain], "streamed_s": [o.latency for o in streamed],
                    "first_piece_s": [o.first_piece for o in streamed], "one_token_s": [o.latency for o in first]},
        "errors": len(errors), "error_samples": errors[:5],
        "responses_503": sum(o.rejected_503 for o in [*plain, *streamed, *first]),
    }


async def prime(base_url: str, prompt: str, max_tokens: int, timeout: float = 300.0) -> StreamOutcome:
    """One untimed streamed request: the stream's first use may pay for lazy set-up."""
    async with _client(base_url, 1, timeout) as client:
        return await stream_request(client, {"prompts": [prompt], "max_tokens": max_tokens, "temperature": 0.0})

