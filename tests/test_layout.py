"""Batch layout and buckets: pure Python, no model."""

import numpy as np
import pytest

from service.engine.base import GenerationRow
from service.engine.layout import BatchLayout, Buckets


def row(n_prompt: int, max_tokens: int) -> GenerationRow:
    return GenerationRow(tuple(range(1, n_prompt + 1)), max_tokens)


def test_buckets_for_gpt2_window():
    b = Buckets.for_model(context_window=1024, max_batch_size=8, prefill_chunk=16)
    assert b.batch_sizes == (1, 4, 8)
    assert b.cache_sizes == (128, 256, 512, 1040)
    assert Buckets.for_model(1024, 6, 16, smallest_cache=512).batch_sizes == (1, 4, 6)
    assert Buckets.for_model(1024, 16, 16).batch_sizes == (1, 4, 8, 16)
    assert [Buckets.for_model(1024, n, 16).batch_sizes for n in (1, 2, 3)] == [(1,), (1, 2), (1, 3)]


def test_layout_left_pads_to_whole_chunks():
    buckets = Buckets((1, 2, 4), (128, 1040), prefill_chunk=4)
    layout = BatchLayout.build([row(3, 10), row(6, 5), row(1, 2)], buckets, pad_id=99)
    assert (layout.batch_size, layout.prompt_slots, layout.cache_size) == (4, 8, 128)
    assert layout.tokens.tolist() == [
        [99, 99, 99, 99, 99, 1, 2, 3],
        [99, 99, 1, 2, 3, 4, 5, 6],
        [99, 99, 99, 99, 99, 99, 99, 1],
        [99] * 8,  # filler row
    ]
    assert layout.pad.tolist() == [5, 2, 7, 7]
    assert layout.column([0.5, 1.0, 0.0], 0.0, np.float32).tolist() == [0.5, 1.0, 0.0, 0.0]


def test_cache_bucket_counts_padding_and_new_tokens():
    buckets = Buckets.for_model(1024, 8, 16)
    assert BatchLayout.build([row(16, 112)], buckets, 0).cache_size == 128
    assert BatchLayout.build([row(17, 96)], buckets, 0).cache_size == 128  # 32 + 96
    assert BatchLayout.build([row(17, 97)], buckets, 0).cache_size == 256
    # A prompt that fills the window but for one token still fits the largest bucket.
    assert BatchLayout.build([row(1000, 24)], buckets, 0).cache_size == 1040


def test_split_separates_rows_that_do_not_fit_one_cache():
    buckets = Buckets.for_model(1024, 4, 16)
    rows = [row(1000, 10), row(5, 1000), row(5, 10), row(3, 3), row(3, 3), row(3, 3), row(3, 3)]
    # 1008 + 1000 slots can't share a cache; then batches are capped at 4 rows.
    assert buckets.split(rows) == [[0], [1, 2, 3, 4], [5, 6]]


def test_batch_bucket_rounds_up():
    buckets = Buckets((1, 2, 4, 8), (128,), 16)
    assert [buckets.batch_bucket(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    with pytest.raises(StopIteration):
        buckets.batch_bucket(9)
