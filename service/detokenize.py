"""Token ids to text, a few at a time: for streaming, and for stop strings."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Sequence

REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 character
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte-fallback pieces


class IncrementalDetokenizer:
    """A row's new text, piece by piece, as TGI's `Model.decode_token` does it.

    Each call decodes the tokens from `prefix` to the end and from `prefix` to `read` (the
    tokens whose text has gone out) and returns the difference. Decoding a window rather than
    one token keeps what a decoder does at a token's edges right: SentencePiece's decoder strips
    the space before the first word of what it decodes, and the window's first token is in both
    decodes, so the strip cancels out. Text is held back (and `read` stays) while it may still
    change:
    - it ends in U+FFFD: a byte-level BPE token ended inside a UTF-8 character;
    - the last token is a byte-fallback piece (`<0xE6>`): SentencePiece's ByteFallback decodes a
      run of such pieces together, and a later piece that makes the run invalid UTF-8 turns the
      whole run, characters already complete included, into one U+FFFD per byte.
    `flush` at the end gives what the full text has there. Joined, the pieces are exactly
    `decode(all tokens)`.

    `byte_ids` are the byte-fallback pieces' ids (`byte_fallback_ids`, an engine's
    `byte_fallback_ids`); none for byte-level BPE.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], byte_ids: Collection[int] = ()):
        self._decode = decode
        self._byte_ids = frozenset(byte_ids)
        self._ids: list[int] = []
        self._prefix = 0  # the window starts here: text before it has gone out
        self._read = 0  # tokens up to here have gone out as text

    def add(self, tokens: Sequence[int]) -> str:
        self._ids += tokens
        if not self._ids or self._ids[-1] in self._byte_ids:
            return ""
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


def byte_fallback_ids(tokenizer) -> frozenset[int]:
    """The ids of a `tokenizers.Tokenizer`'s byte-fallback pieces (`<0x00>`..`<0xFF>`), if its
    decoder has a ByteFallback step (Llama's, TinyLlama's); none for byte-level BPE (GPT-2's)."""
    def has_byte_fallback(decoder) -> bool:
        if not decoder:
            return False
        return decoder.get("type") == "ByteFallback" or any(map(has_byte_fallback, decoder.get("decoders") or ()))

    if not has_byte_fallback(json.loads(tokenizer.to_str()).get("decoder")):
        return frozenset()
    return frozenset(i for piece, i in tokenizer.get_vocab(with_added_tokens=True).items()
                     if _BYTE_TOKEN.fullmatch(piece))


def first_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Where the first of `stops` begins in `text` at or after `start`, or None."""
    found = [at for at in (text.find(stop, start) for stop in stops) if at >= 0]
    return min(found) if found else None
