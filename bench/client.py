"""One /generate request as a benchmark client sends it: unstreamed (`send`) or streamed
(`stream_request`), with the same 503 handling.

A 503 (the queue is full: an intended answer) is counted and the same request is sent again
after the server's Retry-After (capped), so every scenario generates the same work; every time
runs from the first attempt. Anything else that is not a well-formed 200 is an error.

The stream is the server's contract (README, "Streaming"): `POST /generate` with `"stream":
true` answers 200 with `text/event-stream`, one `data: <json>` event per text piece
(`{"index": 0, "text": " the"}`), a final event per prompt that carries `finish_reason`,
`prompt_tokens` and `generated_tokens`, then `data: [DONE]`. Every request here carries one prompt.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from dataclasses import dataclass

import httpx

MAX_RETRY_WAIT = 2.0
MAX_ATTEMPTS = 50


@dataclass
class RequestOutcome:
    prompt: str
    latency: float | None = None  # seconds, first attempt to answer; None unless answered 200
    text: str | None = None
    rejected_503: int = 0  # how many attempts got an intended 503
    error: str | None = None


def retry_after(response: httpx.Response) -> float:
    try:
        return min(max(float(response.headers.get("retry-after", "0.5")), 0.05), MAX_RETRY_WAIT)
    except ValueError:
        return 0.5


async def send(client: httpx.AsyncClient, body: dict, outcome: RequestOutcome) -> None:
    """POST `body` unstreamed until it is answered; the answer (or the error) goes to `outcome`."""
    start = time.perf_counter()
    for _ in range(MAX_ATTEMPTS):
        try:
            r = await client.post("/generate", json=body)
        except httpx.HTTPError as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
            return
        if r.status_code == 503:
            outcome.rejected_503 += 1
            await asyncio.sleep(retry_after(r))
            continue
        if r.status_code != 200:
            outcome.error = f"HTTP {r.status_code}: {r.text[:200]}"
            return
        try:
            results = r.json()["results"]
            if not (isinstance(results, list) and len(results) == 1 and isinstance(results[0], str)):
                raise ValueError(f"expected one string, got {results!r:.100}")
        except (ValueError, KeyError, TypeError) as exc:
            outcome.error = f"bad body: {exc}"
            return
        outcome.text = results[0]
        outcome.latency = time.perf_counter() - start
        return
    outcome.error = f"still 503 after {MAX_ATTEMPTS} attempts"


def time_per_output_token(ttft: float | None, latency: float | None, tokens: int | None) -> float | None:
    """(latency − ttft) / (tokens − 1): the pace of the tokens after the first, as the client
    saw them. None for fewer than 2 tokens, where there is no such pace."""
    if ttft is None or latency is None or tokens is None or tokens < 2:
        return None
    return (latency - ttft) / (tokens - 1)


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
    generated_tokens: int | None = None  # the server's count, from the final event
    rejected_503: int = 0
    error: str | None = None

    def add_piece(self, text: str, elapsed: float) -> None:
        """An event's text, `elapsed` seconds in (an empty text is no piece)."""
        if text:
            self.pieces += 1
            self.text += text
            if self.first_piece is None:
                self.first_piece = elapsed

    def finish(self, reason: str, prompt_tokens, generated_tokens, elapsed: float, event: str, count: str) -> None:
        """The final event, `elapsed` seconds in: it counts as the first piece if none came
        before. Without the server's count of new tokens (its field `count`) it is refused,
        named by `event`, its text."""
        if not isinstance(generated_tokens, int):
            raise ValueError(f"final event without {count}: {event[:100]!r}")
        self.finish_reason, self.prompt_tokens, self.generated_tokens = reason, prompt_tokens, generated_tokens
        self.final_event = elapsed
        if self.first_piece is None:
            self.first_piece = elapsed

    @property
    def ttft(self) -> float | None:
        """Time to first token: to the first piece of a complete stream."""
        return self.first_piece if self.latency is not None else None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first, over the whole request (to [DONE])."""
        return time_per_output_token(self.ttft, self.latency, self.generated_tokens)

    @property
    def per_token(self) -> float | None:
        """Seconds per generated token from the first piece to the final event: the decode
        steps' pace as streamed (bench/stream.py's overhead scenario)."""
        if self.first_piece is None or self.final_event is None or not self.generated_tokens:
            return None
        if self.generated_tokens < 2:
            return None
        return (self.final_event - self.first_piece) / (self.generated_tokens - 1)


def parse_event(line: str, outcome: StreamOutcome, elapsed: float) -> bool:
    """Apply one `data:` line, read `elapsed` seconds after the first attempt, to `outcome`;
    True at [DONE]. Raises ValueError on a malformed event."""
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
    outcome.add_piece(event["text"], elapsed)
    if "finish_reason" in event:
        outcome.finish(event["finish_reason"], event.get("prompt_tokens"), event.get("generated_tokens"), elapsed,
                       payload, "generated_tokens")
    return False


async def stream_request(client: httpx.AsyncClient, body: dict, on_first_piece=None) -> StreamOutcome:
    """Send `body` with stream=true and read its events; a 503 is retried as `send` does.

    `on_first_piece()` is called once, when the first piece arrives (the request is decoding).
    """
    body = {**body, "stream": True}
    outcome = StreamOutcome(prompt=body["prompts"][0], max_tokens=body["max_tokens"])
    read = functools.partial(_read_stream, on_first_piece=on_first_piece)
    return await stream_events(client, "/generate", body, outcome, read)


async def stream_events(client: httpx.AsyncClient, path: str, payload: dict, outcome: StreamOutcome, read,
                        headers: dict | None = None) -> StreamOutcome:
    """POST `payload` to `path` and, once it answers 200 with an event stream, read it into
    `outcome` with `await read(response, outcome, start)`; a 503 is waited out (Retry-After) and
    sent again, up to MAX_ATTEMPTS. Any other status, or a body that is not a stream, is the
    outcome's error."""
    start = time.perf_counter()
    for _ in range(MAX_ATTEMPTS):
        try:
            async with client.stream("POST", path, json=payload, headers=headers) as r:
                if r.status_code == 503:
                    await r.aread()
                    outcome.rejected_503 += 1
                    wait = retry_after(r)
                else:
                    if await _is_stream(r, outcome):
                        await read(r, outcome, start)
                    return outcome
        except httpx.HTTPError as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
            return outcome
        await asyncio.sleep(wait)
    outcome.error = f"still 503 after {MAX_ATTEMPTS} attempts"
    return outcome


async def _is_stream(r: httpx.Response, outcome: StreamOutcome) -> bool:
    """Whether `r` is a 200 event stream; else says why in the outcome's error."""
    if r.status_code != 200:
        outcome.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
        return False
    kind = r.headers.get("content-type", "")
    if not kind.startswith("text/event-stream"):
        outcome.error = f"not a stream: content-type {kind!r}, body {(await r.aread())[:100]!r}"
        return False
    return True


async def _read_stream(r: httpx.Response, outcome: StreamOutcome, start: float, on_first_piece) -> None:
    try:
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, and SSE comments or fields we do not use
            had_piece = outcome.first_piece is not None
            if parse_event(line, outcome, time.perf_counter() - start):
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
