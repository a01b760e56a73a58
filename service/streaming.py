"""Text as it is made: incremental detokenization and the server-sent events of POST /generate."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence

from starlette.requests import Request as HTTPRequest

from service.scheduler import Request

REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 character


class IncrementalDetokenizer:
    """A row's new text, piece by piece, as TGI's `Model.decode_token` does it.

    Each call decodes a short window of recent tokens twice (with and without the newest) and
    returns the difference. A byte-level BPE token can end inside a UTF-8 character: while the
    window's text ends in U+FFFD, the text is held back until a later token completes the
    character (or `flush` at the end gives what the full text has there). Joined, the pieces
    are exactly `decode(all tokens)`.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # the window starts here: text before it has gone out
        self._read = 0  # tokens up to here have gone out as text

    def add(self, tokens: Sequence[int]) -> str:
        self._ids += tokens
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) > len(before) and not text.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is held back, once the row has ended."""
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(before):]


async def generate_events(request: Request, decode: Callable[[Sequence[int]], str], prompt_tokens: Sequence[int],
                          on_tokens: Callable[[int], None] = lambda n: None) -> AsyncIterator[str]:
    """The event stream of one streamed POST /generate (the format is in the README): one
    write per wake-up, with every event that came meanwhile (the scheduler paces them)."""
    pieces = [IncrementalDetokenizer(decode) for _ in prompt_tokens]
    generated = [0] * len(prompt_tokens)
    unfinished = len(prompt_tokens)
    try:
        while unfinished:
            events = [await request.events.get()]
            while not request.events.empty():  # what came meanwhile goes out in one write
                events.append(request.events.get_nowait())
            chunk = []
            for event in events:
                if isinstance(event, Exception):
                    chunk.append(_event({"error": str(event)}))
                    unfinished = 0
                    break
                generated[event.index] += len(event.tokens)
                on_tokens(len(event.tokens))
                text = pieces[event.index].add(event.tokens)
                if event.finish is not None:
                    text += pieces[event.index].flush()
                if text:
                    chunk.append(_event({"index": event.index, "text": text}))
                if event.finish is not None:
                    unfinished -= 1
                    chunk.append(_event({"index": event.index, "text": "", "finish_reason": event.finish,
                                         "prompt_tokens": prompt_tokens[event.index],
                                         "generated_tokens": generated[event.index]}))
            if chunk:
                yield "".join(chunk)
        yield "data: [DONE]\n\n"
    finally:
        request.cancel()  # a client that left (the stream is cancelled) costs nothing more


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def results_unless_disconnected(request: Request, http: HTTPRequest) -> list[list[int]] | None:
    """Every row's tokens, or None (and the rows cancelled) if the client disconnects first.

    Nothing else reads this request's ASGI messages once its body is parsed, so the next one
    is the disconnect."""
    results = asyncio.ensure_future(request.results())
    gone = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if results.done():
        return results.result()
    request.cancel()
    results.cancel()
    return None


async def _disconnected(http: HTTPRequest) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass
