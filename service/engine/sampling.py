"""A row's next token from its logits on the host, with the controls of `GenerationRow`.

Shared by the backends that sample on the host (LiteRT always; TF for rows beyond temperature).
The draw is inverse-CDF with uniform numbers from Philox keyed by (seed, stream) at counter
`index` (the token's index in the row), so a row's tokens depend only on its own seed, stream
and logits, never on its neighbours. One counter gives four numbers, which is all a token ever
uses. The search goes by blocks of the vocabulary (their sums, then within the chosen block): a
running sum over all 50257 entries cost 0.4 ms a row, several times the rest of the draw.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from service.engine.base import GenerationRow, TokenLogprob

SAMPLE_BLOCK = 256  # vocabulary entries per block in the sampling search
BINS = 1024  # top-p's log-weight bins, 1/16 unit each (the last holds everything lighter)
NUCLEUS_ATTEMPTS = 3  # top-p draws tried before the nucleus is computed (Philox gives 4 a counter)


def next_token(logits: np.ndarray, row: GenerationRow, index: int, history: Sequence[int] = ()) -> int:
    """The row's token at position `index` of its output, from its logits [vocab] (float32).
    `history` is the prompt's and the generated tokens (only read with a repetition penalty)."""
    if row.repetition_penalty != 1.0 and len(history):
        logits = penalize_repetition(logits, history, row.repetition_penalty)
    if row.temperature <= 0:
        return int(np.argmax(logits))
    uniforms = _uniforms(row.seed, row.stream, index)
    if 0 < row.top_k < len(logits):
        # Only the k likeliest (and ties) can be drawn: the rest of the work is on them alone.
        candidates = top_k_candidates(logits, row.top_k)
        with np.errstate(over="ignore"):
            shifted = logits[candidates] / np.float32(row.temperature)
        if not np.isfinite(shifted.max()):  # a temperature so low the logits overflow: greedy, its limit
            return int(np.argmax(logits))
        shifted -= shifted.max()
        weights = np.exp(shifted)
        if row.top_p < 1.0:
            weights *= nucleus(shifted, weights, row.top_p)
        return int(candidates[Cdf(weights).sample(next(uniforms))])
    # The whole vocabulary's passes write into this thread's buffers, the weights straight into
    # the block-padded one the search reads (no copy to pad them), and the maximum is taken once.
    # At temperature 1 (the default) the division is skipped: x / 1 is x exactly. The same
    # arithmetic as before in the same order, so the same tokens: 98 -> 68 us a row at T=1, 80 else.
    shifted, padded = _buffers(len(logits), np.result_type(logits, np.float32))
    with np.errstate(over="ignore"):
        scaled = logits if row.temperature == 1.0 else np.divide(logits, np.float32(row.temperature), out=shifted)
    top = scaled.max()
    if not np.isfinite(top):  # as above
        return int(np.argmax(logits))
    np.subtract(scaled, top, out=shifted)
    weights = np.exp(shifted, out=padded[:len(logits)])
    cdf = Cdf.over_padded(padded)
    if row.top_p < 1.0:
        return draw_nucleus(weights, cdf, row.top_p, uniforms, shifted)
    return cdf.sample(next(uniforms))


def draw_nucleus(weights: np.ndarray, cdf: Cdf, top_p: float, uniforms, shifted: np.ndarray) -> int:
    """A draw from the nucleus (transformers' TopPLogitsWarper) of the whole vocabulary, by
    rejection: a token drawn from all of `weights` is kept if it is in the nucleus, else another
    is drawn. A draw kept this way has exactly the nucleus's renormalised distribution, and
    telling whether one token is in it takes one pass over the vocabulary (the mass of the
    lighter tokens), where finding the whole nucleus takes a histogram of it: 4x the cost at
    top_p 0.9. After `NUCLEUS_ATTEMPTS` misses (top_p well below the nucleus's share) the
    nucleus is found and drawn from."""
    limit = (1 - top_p) * cdf.total
    for _ in range(NUCLEUS_ATTEMPTS):
        token = cdf.sample(next(uniforms))
        if in_nucleus(weights, token, limit):
            return token
    kept = weights * nucleus(shifted, weights, top_p)
    return Cdf(kept).sample(next(uniforms))


def in_nucleus(weights: np.ndarray, token: int, limit: float) -> bool:
    """Whether `token` survives top-p: sorted ascending (ties by id), the tokens whose cumulative
    weight is at most `limit` go; the heaviest always stays. Branch-free passes: a boolean
    index or np.where over a random mask cost 5-8x a multiply by it."""
    w = weights[token]
    # float32's pairwise sum (relative error about 1e-7 here) at half the cost of a float64 one:
    # only a token whose lighter mass is that close to the limit could be judged otherwise
    # (transformers' own float32 running sum errs more).
    lighter = float(np.multiply(weights, weights < w).sum())
    tied_before = np.count_nonzero(weights[:token] == w)
    if lighter + float(w) * (tied_before + 1) > limit:
        return True
    return not np.any(weights > w) and not np.any(weights[token + 1:] == w)  # the heaviest, last of its ties


def top_k_candidates(logits: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest logits and any tied with the k-th (transformers' TopKLogitsWarper
    keeps ties), in id order.

    A partition of the whole vocabulary costs 0.3 ms a row; the k-th largest logit is at least
    the k-th largest of the vocabulary blocks' maxima, so only the blocks reaching that are
    searched."""
    blocks = np.concatenate([logits, np.full(-len(logits) % SAMPLE_BLOCK, -np.inf, logits.dtype)])
    blocks = blocks.reshape(-1, SAMPLE_BLOCK)
    maxima = blocks.max(axis=1)
    if k <= len(maxima):
        floor = np.partition(maxima, len(maxima) - k)[len(maxima) - k]
        searched = np.flatnonzero(maxima >= floor)
    else:
        searched = np.arange(len(maxima))
    ids = (searched[:, None] * SAMPLE_BLOCK + np.arange(SAMPLE_BLOCK)).ravel()
    values = blocks[searched].ravel()
    kth = np.partition(values, len(values) - k)[len(values) - k]
    return ids[values >= kth]


def penalize_repetition(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor: each token seen has its logit divided by
    the penalty where positive, multiplied where negative."""
    out = logits.copy()
    seen = np.unique(np.asarray(history, np.int64))
    values = out[seen]
    # float32's penalty as transformers has it, applied in float64 (which rounds to float32's own
    # result) and clipped: a penalty near 0 would make a seen token's logit infinite.
    factor = np.float64(max(np.float32(penalty), np.float32(1e-45)))  # 1e-45: float32's least above 0
    values = values.astype(np.float64)
    limit = np.finfo(np.float32).max
    out[seen] = np.clip(np.where(values > 0, values / factor, values * factor), -limit, limit)
    return out


def nucleus(shifted: np.ndarray, weights: np.ndarray, top_p: float) -> np.ndarray:
    """transformers' TopPLogitsWarper as a mask: sorted ascending, tokens whose cumulative
    probability is at most 1 - top_p go (at least the likeliest stays). `shifted` are the
    logits less their maximum (-inf where already filtered), `weights` their exponentials.

    Sorting the whole vocabulary costs milliseconds a row, so the tokens are binned by
    log-weight (bins of 1/16): a bin whose tokens, with every lighter bin, hold at most
    1 - top_p of the mass goes whole, a heavier one stays whole, and only the bin where the
    cumulative mass crosses 1 - top_p is sorted."""
    total = weights.sum(dtype=np.float64)
    bins = np.minimum(-shifted * 16, BINS - 1).astype(np.int64)  # 0 holds the likeliest
    mass = np.bincount(bins, weights=weights, minlength=BINS)
    lighter = np.cumsum(mass[::-1])[::-1] - mass  # mass of every bin lighter than each bin
    limit = (1 - top_p) * total
    heavier = np.flatnonzero(lighter + mass > limit)
    if not len(heavier):  # a top_p so small that 1 - top_p rounds to 1: only the likeliest stays
        return np.arange(len(weights)) == len(shifted) - 1 - int(np.argmax(shifted[::-1]))
    crossing = int(heavier[-1])  # the lightest bin that cannot go whole
    inside = np.flatnonzero(bins == crossing)
    order = inside[np.argsort(weights[inside], kind="stable")]  # ascending
    cumulative = lighter[crossing] + np.cumsum(weights[order], dtype=np.float64)
    keep = bins < crossing
    keep[order[cumulative > limit]] = True
    keep[len(shifted) - 1 - int(np.argmax(shifted[::-1]))] = True  # the likeliest (last of its ties) stays
    return keep


class Cdf:
    """Inverse CDF over unnormalised `weights`, searched by blocks of `SAMPLE_BLOCK` entries."""

    def __init__(self, weights: np.ndarray):
        """A block is summed in float32 (pairwise over 256 entries: relative error about 1e-7, at
        half a float64 sum's cost), the blocks' running sum in float64."""
        self._set_blocks(np.concatenate([weights, np.zeros(-len(weights) % SAMPLE_BLOCK, weights.dtype)]))

    @classmethod
    def over_padded(cls, padded: np.ndarray) -> Cdf:
        """The same over weights already padded with zeros to whole blocks (no copy; the Cdf
        reads `padded` until it is dropped)."""
        cdf = cls.__new__(cls)
        cdf._set_blocks(padded)
        return cdf

    def _set_blocks(self, padded: np.ndarray) -> None:
        self._blocks = padded.reshape(-1, SAMPLE_BLOCK)
        self._block_sums = self._blocks.sum(axis=1).astype(np.float64)
        self._cumulative = np.cumsum(self._block_sums)

    @property
    def total(self) -> float:
        return float(self._cumulative[-1])

    def sample(self, u: float) -> int:
        """The entry where the cumulative weight passes u (in [0, 1)) of the total."""
        cumulative = self._cumulative
        target = u * float(cumulative[-1])
        block = min(int(cumulative.searchsorted(target, side="right")), len(cumulative) - 1)
        # An empty block (every token in it filtered out) is never chosen: searchsorted skips it.
        weights = self._blocks[block]
        within = np.cumsum(weights, dtype=np.float64)
        within += float(cumulative[block] - self._block_sums[block])
        i = int(within.searchsorted(target, side="right"))
        if i == SAMPLE_BLOCK or weights[i] == 0:
            # Rounding can put the target past the block's last token: take that token then.
            i = min(i, int(np.flatnonzero(weights)[-1]))
        return block * SAMPLE_BLOCK + i


def _uniforms(seed: int, stream: int, index: int):
    """The token's uniform numbers: Philox (seed, stream) at counter `index` (4 per counter).
    One Philox per thread is set to that state (3 us) rather than made anew (11 us a row)."""
    philox = getattr(_philox, "generator", None)
    if philox is None:
        philox = _philox.generator = np.random.Generator(np.random.Philox(key=0))
    key = seed + (stream << 64)
    philox.bit_generator.state = {
        "bit_generator": "Philox",
        "state": {"counter": np.array([index, 0, 0, 0], np.uint64),
                  "key": np.array([key & _U64, key >> 64], np.uint64)},
        "buffer": np.zeros(4, np.uint64), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0,
    }
    while True:
        yield philox.random()


_philox = threading.local()


def _buffers(n: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """This thread's buffers for a vocabulary of `n`: one of n entries, and one of n rounded up
    to whole blocks whose entries past n stay zero (only [:n] is ever written). Valid until this
    thread's next draw: nothing keeps them past one."""
    held = getattr(_scratch, "buffers", None)
    if held is None or len(held[0]) != n or held[0].dtype != dtype:
        held = _scratch.buffers = (np.empty(n, dtype), np.zeros(n + (-n % SAMPLE_BLOCK), dtype))
    return held


_scratch = threading.local()
_U64 = 2**64 - 1


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
