"""Buckets: pure Python, no model."""

import pytest

from service.engine.base import GenerationRow
from service.engine.layout import Buckets


def row(n_prompt: int, max_tokens: int) -> GenerationRow:
    return GenerationRow(tuple(range(1, n_prompt + 1)), max_tokens)


def test_buckets_for_gpt2_window():
    b = Buckets.for_model(context_window=1024, max_batch_size=8, prefill_chunk=16)
    assert b.batch_sizes == (1, 4, 8)
    assert b.cache_sizes == (128, 256, 512, 1040)
    assert Buckets.for_model(1024, 6, 16, smallest_cache=512).batch_sizes == (1, 4, 6)
    assert Buckets.for_model(1024, 16, 16).batch_sizes == (1, 4, 8, 16)
    assert [Buckets.for_model(1024, n, 16).batch_sizes for n in (1, 2, 3)] == [(1,), (1, 2), (1, 3)]


def test_a_row_needs_its_whole_prefill_chunks_and_a_slot_a_token():
    buckets = Buckets.for_model(1024, 8, 16)
    assert buckets.prompt_slots(1) == 16 and buckets.prompt_slots(16) == 16 and buckets.prompt_slots(17) == 32
    assert buckets.slots_needed(row(17, 96)) == 113  # no padding in front: 17 + 96
    assert buckets.slots_needed(row(17, 1)) == 32  # the right-padded last chunk
    assert buckets.cache_bucket(buckets.slots_needed(row(17, 111))) == 128
    assert buckets.cache_bucket(buckets.slots_needed(row(17, 112))) == 256
    # A prompt that fills the window but for one token still fits the largest bucket.
    assert buckets.cache_bucket(buckets.slots_needed(row(1023, 1))) == 1040
    assert buckets.cache_bucket(buckets.slots_needed(row(1000, 24))) == 1040


def test_batch_bucket_rounds_up():
    buckets = Buckets((1, 2, 4, 8), (128,), 16)
    assert [buckets.batch_bucket(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(StopIteration):
        buckets.batch_bucket(9)
