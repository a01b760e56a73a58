"""Token ids to text, a few at a time: for streaming, and for stop strings."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def first_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Where the first of `stops` begins in `text` at or after `start`, or None."""
    found = [at for at in (text.find(stop, start) for stop in stops) if at >= 0]
    return min(found) if found else None
