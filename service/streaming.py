"""Text as it is made: incremental detokenization and the server-sent events of POST /generate."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from starlette.requests import Request as HTTPRequest

from service.detokenize import IncrementalDetokenizer, first_stop
from service.scheduler import GenerationFailed, Request

T = TypeVar("T")


async def generate_events(request: Request, decode: Callable[[Sequence[int]], str], prompt_tokens: Sequence[int],
                          stops: Sequence[str] = (), on_tokens: Callable[[int], None] = lambda n: None,
                          byte_ids: Collection[int] = ()) -> AsyncIterator[str]:
    """The event stream of one streamed POST /generate (the format is in docs/api.md): one
    write per wake-up, with every piece that came meanwhile (the scheduler paces them)."""
    generated = [0] * len(prompt_tokens)
    try:
        async for deltas in completion_deltas(request, decode, stops, byte_ids):
            chunk = []
            for d in deltas:
                on_tokens(d.tokens - generated[d.index])
                generated[d.index] = d.tokens
                if d.text:
                    chunk.append(sse_event({"index": d.index, "text": d.text}))
                if d.finish is not None:
                    chunk.append(sse_event({"index": d.index, "text": "", "finish_reason": d.finish,
                                         "prompt_tokens": prompt_tokens[d.index], "generated_tokens": d.tokens}))
            if chunk:
                yield "".join(chunk)
    except GenerationFailed as exc:  # the status has gone out: say so in the stream
        yield sse_event({"error": str(exc)})
    yield "data: [DONE]\n\n"


def sse_event(data: dict) -> str:
    """One server-sent event: a `data:` line holding `data` as JSON, and a blank line."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def results_unless_disconnected(request: Request, http: HTTPRequest) -> list[list[int]] | None:
    """Every row's tokens, or None (and the rows cancelled) if the client disconnects first."""
    return await unless_disconnected(request.results(), request, http)


async def unless_disconnected(work: Awaitable[T], request: Request, http: HTTPRequest) -> T | None:
    """`work`'s result, or None (and the request's rows cancelled) if the client disconnects
    first. Nothing else reads this request's ASGI messages once its body is parsed, so the next
    one is the disconnect."""
    result = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if result.done():
        return result.result()
    request.cancel()
    result.cancel()
    return None


async def _disconnected(http: HTTPRequest) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


@dataclass(frozen=True)
class ChoiceDelta:
    """New text of one row, and why it ended once it has ("eos_token", "length" or
    "stop_sequence"); `tokens` is the row's token count so far."""

    index: int
    text: str
    finish: str | None
    tokens: int
    logprobs: list = field(default_factory=list)  # TokenLogprobs of the tokens since the last delta


async def completion_deltas(request: Request, decode: Callable[[Sequence[int]], str],
                            stops: Sequence[str] = (), byte_ids: Collection[int] = ()
                            ) -> AsyncIterator[list[ChoiceDelta]]:
    """The rows' text as it comes, cut before the first stop string.

    Stop strings are matched on the decoded text, across token boundaries: the last
    `len(longest stop) - 1` characters are held back until later text shows they do not start
    one. The scheduler ends a row whose text reaches one (`submit(stops=...)`) at that decode
    call; here its text is cut before the stop string. `byte_ids`: the engine's
    `byte_fallback_ids` (IncrementalDetokenizer)."""
    rows = len(request.rows)
    pieces = [IncrementalDetokenizer(decode, byte_ids) for _ in range(rows)]
    text, sent, tokens, done = [""] * rows, [0] * rows, [0] * rows, [False] * rows
    logprobs: list[list] = [[] for _ in range(rows)]
    hold = max((len(stop) for stop in stops), default=1) - 1
    try:
        while not all(done):
            events = [await request.events.get()]
            while not request.events.empty():
                events.append(request.events.get_nowait())
            deltas = []
            for event in events:
                if isinstance(event, Exception):
                    raise event
                i = event.index
                if done[i]:
                    continue  # made before the row's stop string was seen
                tokens[i] += len(event.tokens)
                logprobs[i] += event.logprobs or []
                text[i] += pieces[i].add(event.tokens)
                if event.finish is not None:
                    text[i] += pieces[i].flush()
                cut = first_stop(text[i], stops, max(0, sent[i] - hold))
                if cut is not None:
                    deltas.append(ChoiceDelta(i, text[i][sent[i]:cut], "stop_sequence", tokens[i], logprobs[i]))
                elif event.finish is not None:
                    deltas.append(ChoiceDelta(i, text[i][sent[i]:], event.finish, tokens[i], logprobs[i]))
                else:
                    upto = max(sent[i], len(text[i]) - hold)
                    if upto > sent[i]:
                        deltas.append(ChoiceDelta(i, text[i][sent[i]:upto], None, tokens[i], logprobs[i]))
                        logprobs[i] = []
                    sent[i] = upto
                    continue
                done[i] = True
            if deltas:
                yield deltas
    finally:
        request.cancel()  # a client that left, or a failure: the rows still running leave
