"""Incremental detokenization on the tokenizer kinds GPT-family models ship, built here with the
`tokenizers` library (no downloads): GPT-2's byte-level BPE, and SentencePiece-style BPE with
byte fallback and the `▁` metaspace, as Llama 2's and TinyLlama's tokenizer.json have it (a
Prepend + Replace normalizer) and as newer conversions do (a Metaspace pre-tokenizer and
decoder). Random token ids (invalid UTF-8 included) and random texts, fed one or a few tokens
at a time: what has gone out is always a prefix of the full text, and all of it joined is the
full text."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import ByteLevelBPETokenizer, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from conftest import ROOT
from service.detokenize import REPLACEMENT, IncrementalDetokenizer, byte_fallback_ids

sys.path.insert(0, str(ROOT / "scripts"))
import make_test_model  # noqa: E402

KINDS = ["byte_level", "llama", "metaspace"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
# Text the tokenizers learn as whole tokens, and text they see too rarely to (byte fallback).
EXTRA = ["naïve café — ünïcödé", "日本語のテキスト", "中文：你好，世界。"]
PIECES = ["", " ", "  ", "   ", "\n", "\n\n", " \n ", "\t", "日本語", "你好", "🎉🚀", "👍🏽", "é", "naïve",
          "Hello", " world", "def f(x):", "▁", "<0x41>", "\ufffd", "<s>"]
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def corpus() -> list[str]:
    files = make_test_model.corpus_files(200_000)
    return [Path(f).read_text(encoding="utf-8", errors="replace") for f in files] + EXTRA


def byte_level() -> Tokenizer:
    """GPT-2's kind, trained as scripts/make_test_model.py trains it."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(), vocab_size=600, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return bpe._tokenizer


def sentencepiece(metaspace: bool) -> Tokenizer:
    """Llama's kind: BPE over `▁`-joined words, <unk> <s> </s>, then the 256 byte pieces, which
    encode what the vocabulary lacks (a small alphabet, so CJK and emoji fall back to bytes)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")])
    else:  # Llama 2's and TinyLlama's tokenizer.json
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>"] + BYTES,
                                  limit_alphabet=70, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    # The byte pieces are plain vocabulary in Llama's file, not added tokens matched in the text.
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in BYTES]
    return Tokenizer.from_str(json.dumps(data))


@pytest.fixture(scope="module", params=KINDS)
def tokenizer(request) -> Tokenizer:
    return byte_level() if request.param == "byte_level" else sentencepiece(metaspace=request.param == "metaspace")


def decoder_of(tokenizer: Tokenizer):
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False)


def check_stream(tokenizer: Tokenizer, ids: list[int], step: int) -> None:
    """Feed `ids` `step` at a time: after every call, the text gone out is a prefix of the text
    of the tokens so far (so it never takes anything back, and has U+FFFD only where the full
    text does); after `flush`, it is the full text."""
    decode = decoder_of(tokenizer)
    detokenizer = IncrementalDetokenizer(decode, byte_fallback_ids(tokenizer))
    out = ""
    for i in range(0, len(ids), step):
        out += detokenizer.add(ids[i:i + step])
        now = decode(ids[:i + step])
        assert now.startswith(out), (ids[:i + step], out, now)
    out += detokenizer.flush()
    assert out == decode(ids), (ids, out)


def test_byte_fallback_ids_are_the_byte_pieces_of_sentencepiece_tokenizers_only(tokenizer):
    found = byte_fallback_ids(tokenizer)
    if tokenizer.decoder.__class__.__name__ == "ByteLevel":
        assert found == frozenset()
    else:
        assert sorted(tokenizer.id_to_token(i) for i in found) == BYTES
        assert "<0xE6>" in tokenizer.encode("日本").tokens  # the kanji are not in the vocabulary: bytes


def test_leading_trailing_and_repeated_spaces_stream_as_the_full_text_has_them(tokenizer):
    """The SentencePiece decoders strip the space of the first `▁` they decode: in a window of
    recent tokens, not only at the start of the text. (The Metaspace kind's own round trip loses
    a text's leading spaces: that is the tokenizer's, and the stream is its decode all the same.)"""
    text = "  two  spaces, then\n\na newline  日本語 🎉  "
    ids = tokenizer.encode(text).ids
    if tokenizer.pre_tokenizer is None or tokenizer.pre_tokenizer.__class__.__name__ != "Metaspace":
        assert tokenizer.decode(ids) == text
    for step in (1, 2, 3):
        check_stream(tokenizer, ids, step)


def test_a_later_byte_piece_that_breaks_the_run_is_not_sent_twice():
    """ByteFallback decodes a run of byte pieces together: `<0xE6><0x97><0xA5>` is 日, and one more
    continuation byte makes all four U+FFFD. Sending 日 as soon as it is complete would have
    left it in the stream while the full text has U+FFFD there."""
    tok = sentencepiece(metaspace=False)
    ids = [tok.token_to_id(p) for p in ("a", "<0xE6>", "<0x97>", "<0xA5>", "<0x97>", "b")]
    assert tok.decode(ids).count(REPLACEMENT) == 4
    check_stream(tok, ids, 1)


def random_ids(tokenizer: Tokenizer):
    byte_ids = sorted(byte_fallback_ids(tokenizer)) or [tokenizer.get_vocab_size() - 1]
    token = st.one_of(st.integers(0, tokenizer.get_vocab_size() - 1), st.sampled_from(byte_ids))
    return st.lists(token, min_size=1, max_size=24)


texts = st.lists(st.one_of(st.text(max_size=6), st.sampled_from(PIECES)), max_size=12).map("".join)


@SETTINGS
@given(data=st.data(), step=st.integers(1, 3))
def test_random_tokens_stream_to_the_full_text(tokenizer, data, step):
    check_stream(tokenizer, data.draw(random_ids(tokenizer)), step)


@SETTINGS
@given(text=texts, step=st.integers(1, 3))
def test_random_texts_stream_to_the_full_text(tokenizer, text, step):
    ids = tokenizer.encode(text).ids
    check_stream(tokenizer, ids, step)
    if tokenizer.decoder.__class__.__name__ == "ByteLevel":
        assert tokenizer.decode(ids) == text
