"""A row's next token from its logits on the host, with the controls of `GenerationRow`.

Shared by the backends that sample on the host (LiteRT always; TF for rows beyond temperature).
The draw is inverse-CDF with one uniform number from Philox keyed by (seed, stream) at counter
`index` (the token's index in the row), so a row's tokens depend only on its own seed, stream
and logits, never on its neighbours. The search goes by blocks of the vocabulary (their sums,
then within the chosen block): a running sum over all 50257 entries cost 0.4 ms a row, several
times the rest of the draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.engine.base import GenerationRow, TokenLogprob

SAMPLE_BLOCK = 256  # vocabulary entries per block in the sampling search
TOP_P_CANDIDATES = 1024  # top-p sorts only this many of the likeliest tokens, unless they fall short


def next_token(logits: np.ndarray, row: GenerationRow, index: int, history: Sequence[int] = ()) -> int:
    """The row's token at position `index` of its output, from its logits [vocab] (float32).
    `history` is the prompt's and the generated tokens (only read with a repetition penalty)."""
    if row.repetition_penalty != 1.0 and len(history):
        logits = penalize_repetition(logits, history, row.repetition_penalty)
    if row.temperature <= 0:
        return int(np.argmax(logits))
    x = logits / np.float32(row.temperature)
    if row.top_k > 0 and row.top_k < len(x):
        x = keep_top_k(x, row.top_k)
    if row.top_p < 1.0:
        x = keep_top_p(x, row.top_p)
    x = x - x.max()
    return draw(np.exp(x), row.seed, row.stream, index)


def penalize_repetition(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor: each token seen has its logit divided by
    the penalty where positive, multiplied where negative."""
    out = logits.copy()
    seen = np.unique(np.asarray(history, np.int64))
    values = out[seen]
    out[seen] = np.where(values > 0, values / np.float32(penalty), values * np.float32(penalty))
    return out


def keep_top_k(x: np.ndarray, k: int) -> np.ndarray:
    """transformers' TopKLogitsWarper: logits below the k-th largest become -inf."""
    kth = np.partition(x, len(x) - k)[len(x) - k]
    return np.where(x < kth, -np.inf, x).astype(np.float32)


def keep_top_p(x: np.ndarray, top_p: float) -> np.ndarray:
    """transformers' TopPLogitsWarper: sorted ascending, tokens whose cumulative probability is at
    most 1 - top_p go (at least the likeliest stays).

    Sorting the whole vocabulary costs milliseconds a row; the likeliest `TOP_P_CANDIDATES`
    tokens nearly always hold the mass, so only they are sorted, unless they fall short."""
    finite = np.isfinite(x)
    weights = np.exp(x - x[finite].max()) * finite
    total = weights.sum(dtype=np.float64)
    candidates = np.argpartition(weights, -TOP_P_CANDIDATES)[-TOP_P_CANDIDATES:] if len(x) > TOP_P_CANDIDATES \
        else np.arange(len(x))
    if weights[candidates].sum(dtype=np.float64) < top_p * total:  # the tail matters: sort it all
        candidates = np.arange(len(x))
    order = candidates[np.argsort(weights[candidates], kind="stable")]  # ascending
    # The tokens outside the candidates are less likely than all of them: their mass comes first.
    cumulative = (total - weights[candidates].sum(dtype=np.float64)) + np.cumsum(weights[order], dtype=np.float64)
    remove = cumulative / total <= 1 - top_p
    remove[-1] = False
    keep = np.zeros(len(x), bool)
    keep[order[~remove]] = True
    return np.where(keep, x, -np.inf).astype(np.float32)


def draw(weights: np.ndarray, seed: int, stream: int, index: int) -> int:
    """Inverse CDF over unnormalised `weights` with Philox (seed, stream) at counter `index`."""
    blocks = np.concatenate([weights, np.zeros(-len(weights) % SAMPLE_BLOCK, weights.dtype)]).reshape(-1, SAMPLE_BLOCK)
    block_sums = blocks.sum(axis=1, dtype=np.float64)
    cumulative = np.cumsum(block_sums)
    u = np.random.Generator(np.random.Philox(key=seed + (stream << 64), counter=index)).random()
    target = u * cumulative[-1]
    block = min(int(np.searchsorted(cumulative, target, side="right")), len(cumulative) - 1)
    # An empty block (every token in it filtered out) is never chosen: searchsorted skips it.
    within = np.cumsum(blocks[block], dtype=np.float64) + (cumulative[block] - block_sums[block])
    # Rounding can put the target past the block's last token: take that token then.
    last = int(np.flatnonzero(blocks[block])[-1])
    return block * SAMPLE_BLOCK + min(int(np.searchsorted(within, target, side="right")), last)


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """log-softmax of the raw logits at `token`, and the `top` likeliest tokens' (finite: float32
    logits give finite log-probabilities; anything else is clamped)."""
    shifted = logits.astype(np.float64) - float(logits.max())
    logz = float(np.log(np.exp(shifted).sum()))
    best = np.argpartition(shifted, -top)[-top:] if top else np.zeros(0, np.int64)
    best = best[np.argsort(-shifted[best], kind="stable")]
    return TokenLogprob(int(token), _finite(shifted[token] - logz),
                        tuple((int(t), _finite(shifted[t] - logz)) for t in best))


def _finite(value: float) -> float:
    return float(np.clip(np.nan_to_num(value, nan=-1e9, neginf=-1e9), -1e9, 0.0))
