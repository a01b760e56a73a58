"""Issue 8's scenarios: a client for streamed /generate answers and the three loads that use it.

The stream is the server's contract: `POST /generate` with `"stream": true` answers 200 with
`text/event-stream`, one `data: <json>` event per text piece (`{"index": 0, "text": " the"}`), a
final event per prompt that carries `finish_reason`, `prompt_tokens` and `generated_tokens`, then
`data: [DONE]`. Every time here is client-side, from `time.perf_counter()` at the first attempt,
and every request carries one prompt.

- head of line: a short request timed on the idle server, then while long requests stream;
- uneven load: clients with think times and uneven token budgets, and the same requests in
  lockstep rounds (the two halves are measured separately, so each gets its own /metrics window);
- streaming overhead: the same request unstreamed, streamed, and unstreamed with max_tokens=1.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass

import httpx

from bench.config import HeadOfLine, StreamOverhead, UnevenLoad
from bench.load import MAX_ATTEMPTS, RequestOutcome, percentile, retry_after, send


@dataclass
class StreamOutcome:
    """One streamed request as the client saw it; times in seconds from its first attempt."""

    prompt: str
    max_tokens: int
    first_piece: float | None = None  # the first event with text (or the final event, if none had text)
    final_event: float | None = None  # the event that carries finish_reason
    latency: float | None = None  # [DONE]; None unless the stream was complete and well formed
    pieces: int = 0
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    rejected_503: int = 0
    error: str | None = None

    @property
    def per_token(self) -> float | None:
        """Seconds per generated token after the first piece: the decode steps' pace as streamed."""
        if self.first_piece is None or self.final_event is None or not self.generated_tokens:
            return None
        if self.generated_tokens < 2:
            return None
        return (self.final_event - self.first_piece) / (self.generated_tokens - 1)


def _parse_event(line: str, outcome: StreamOutcome, elapsed: float) -> bool:
    """Apply one `data:` line to `outcome`; True at [DONE]. Raises ValueError on a malformed event."""
    payload = line[len("data:"):].strip()
    if payload == "[DONE]":
        return True
    event = json.loads(payload)
    if isinstance(event, dict) and "error" in event:
        raise ValueError(f"the server failed mid-stream: {event['error']}"[:300])
    if not isinstance(event, dict) or event.get("index") != 0 or not isinstance(event.get("text"), str):
        raise ValueError(f"unexpected event {payload[:100]!r}")
    if outcome.finish_reason is not None:
        raise ValueError(f"event after the final one: {payload[:100]!r}")
    if event["text"]:
        outcome.pieces += 1
        outcome.text += event["text"]
        if outcome.first_piece is None:
            outcome.first_piece = elapsed
    if "finish_reason" in event:
        outcome.finish_reason = event["finish_reason"]
        outcome.prompt_tokens = event.get("prompt_tokens")
        outcome.generated_tokens = event.get("generated_tokens")
        outcome.final_event = elapsed
        if outcome.first_piece is None:
            outcome.first_piece = elapsed
    return False


async def stream_request(client: httpx.AsyncClient, body: dict, on_first_piece=None) -> StreamOutcome:
    """Send `body` with stream=true and read its events; a 503 is retried as bench.load does.

    `on_first_piece()` is called once, when the first piece arrives (the request is decoding).
    """
    body = {**body, "stream": True}
    outcome = StreamOutcome(prompt=body["prompts"][0], max_tokens=body["max_tokens"])
    start = time.perf_counter()
    for _ in range(MAX_ATTEMPTS):
        try:
            async with client.stream("POST", "/generate", json=body) as r:
                if r.status_code == 503:
                    await r.aread()
                    outcome.rejected_503 += 1
                    wait = retry_after(r)
                else:
                    await _read_stream(r, outcome, start, on_first_piece)
                    return outcome
        except httpx.HTTPError as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
            return outcome
        await asyncio.sleep(wait)
    outcome.error = f"still 503 after {MAX_ATTEMPTS} attempts"
    return outcome


async def _read_stream(r: httpx.Response, outcome: StreamOutcome, start: float, on_first_piece) -> None:
    if r.status_code != 200:
        outcome.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
        return
    kind = r.headers.get("content-type", "")
    if not kind.startswith("text/event-stream"):
        outcome.error = f"not a stream: content-type {kind!r}, body {(await r.aread())[:100]!r}"
        return
    try:
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, and SSE comments or fields we do not use
            had_piece = outcome.first_piece is not None
            if _parse_event(line, outcome, time.perf_counter() - start):
                if outcome.finish_reason is None:
                    raise ValueError("[DONE] before the final event")
                outcome.latency = time.perf_counter() - start
                return
            if not had_piece and outcome.first_piece is not None and on_first_piece is not None:
                on_first_piece()
    except ValueError as exc:
        outcome.error = f"bad stream: {exc}"
        return
    outcome.error = "the stream ended without [DONE]"


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

