"""The host sampler: its draw over the whole vocabulary, and top-p (rejection against the whole
vocabulary, and the nucleus it falls back to)."""

import numpy as np
import pytest

from service.engine.base import GenerationRow
from service.engine.sampling import Cdf, _uniforms, in_nucleus, next_token, nucleus


def nucleus_reference(logits, temperature, top_p):
    """transformers' TopPLogitsWarper on logits / temperature, as probabilities (a stable sort,
    so tied tokens leave in id order)."""
    x = logits.astype(np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(p, kind="stable")
    remove = np.cumsum(p[order]) <= 1 - top_p
    remove[-1] = False
    p[order[remove]] = 0
    return p / p.sum()


def test_membership_agrees_with_the_nucleus_mask_including_ties():
    rng = np.random.default_rng(0)
    for trial in range(40):
        logits = (rng.standard_normal(3000) * rng.uniform(0.2, 6)).astype(np.float32)
        logits[rng.integers(0, 3000, 300)] = logits[rng.integers(0, 3000)]  # many exact ties
        top_p = rng.uniform(0.05, 0.99)
        shifted = logits / np.float32(0.9)
        shifted -= shifted.max()
        weights = np.exp(shifted)
        mask = nucleus(shifted, weights, top_p)
        limit = (1 - top_p) * weights.sum(dtype=np.float64)
        assert [in_nucleus(weights, t, limit) for t in range(3000)] == list(mask), trial


@pytest.mark.parametrize("top_p", [0.9, 0.3])  # 0.3: the nucleus holds less than the attempts need
def test_top_p_draws_follow_the_filtered_softmax(top_p):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal(400) * 1.5).astype(np.float32)
    expected = nucleus_reference(logits, 0.8, top_p)
    n = 4000
    draws = [next_token(logits, GenerationRow((0,), 1, 0.8, seed, 0, top_p=top_p), 0) for seed in range(n)]
    counts = np.bincount(draws, minlength=len(logits)) / n
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(expected))  # nothing filtered out is drawn
    noise = [0.5 * np.abs(rng.multinomial(n, expected) / n - expected).sum() for _ in range(200)]
    assert 0.5 * np.abs(counts - expected).sum() <= max(noise)


def test_top_p_draws_are_seeded():
    logits = np.random.default_rng(2).standard_normal(1000).astype(np.float32)
    row = GenerationRow((0,), 1, 1.0, 7, 3, top_p=0.5)
    draws = [next_token(logits, row, i) for i in range(40)]
    assert draws == [next_token(logits, row, i) for i in range(40)]
    assert draws != [next_token(logits, GenerationRow((0,), 1, 1.0, 8, 3, top_p=0.5), i) for i in range(40)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_draw_is_the_inverse_cdf_of_the_softmax_whatever_vocabulary_came_before(temperature):
    """The draw reuses per-thread buffers (the weights written straight into a block-padded one)
    and skips the division at temperature 1: the token is still the inverse CDF of
    exp(logits / T - max) at the row's uniform number, as a Cdf built afresh gives it, after
    draws over other vocabulary sizes (the buffers' padding stays zero) and other dtypes."""
    rng = np.random.default_rng(5)
    for trial in range(60):
        size = [50257, 300, 256, 1000][trial % 4]
        dtype = np.float64 if trial % 5 == 4 else np.float32
        logits = (rng.standard_normal(size) * 4).astype(dtype)
        row = GenerationRow((0,), 1, temperature, int(rng.integers(1 << 32)), 0)
        scaled = logits / np.float32(temperature)
        expected = Cdf(np.exp(scaled - scaled.max())).sample(next(_uniforms(row.seed, row.stream, 3)))
        assert next_token(logits, row, 3) == expected
