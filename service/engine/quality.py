"""The int8 quality gate: int8 weights serve only where they keep the model's own predictions.

At conversion, the fp32 and int8 LiteRT models read the same fixed English text
(`service/data/quality_text.txt`) by teacher forcing, through the same decode path that serves
requests: the int8 file's key/value cache is float16 (`litert_convert.FILES`), so the gate
judges the int8 weights and the smaller cache together. int8 is enabled only if its top-1
next-token prediction agrees with fp32's at least `MIN_AGREEMENT` of the time and its
perplexity on the text is less than `MAX_PERPLEXITY_RISE` above fp32's. Random weights say
nothing about a real model's int8 quality; the gate exists so that the user's own weights decide.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from service.engine.litert_gpt2 import Decoder

TEXT = Path(__file__).resolve().parents[1] / "data" / "quality_text.txt"
MIN_AGREEMENT = 0.98
MAX_PERPLEXITY_RISE = 0.03
WINDOWS = 8  # rows decoded together
WINDOW = 512  # tokens a row (at most)


@dataclass(frozen=True)
class QualityReport:
    tokens: int  # predictions compared
    agreement: float  # share of positions where int8's top-1 token is fp32's
    perplexity_fp32: float
    perplexity_int8: float
    perplexity_rise: float  # int8 / fp32 - 1
    int8_enabled: bool
    reason: str

    def as_dict(self) -> dict:
        return {**asdict(self), "min_agreement": MIN_AGREEMENT, "max_perplexity_rise": MAX_PERPLEXITY_RISE,
                "text": TEXT.name}


def windows(ids: list[int], context_window: int) -> np.ndarray:
    """The text's tokens as up to WINDOWS rows of equal length (at most WINDOW tokens each)."""
    width = min(WINDOW, context_window, len(ids) // WINDOWS or len(ids))
    rows = min(WINDOWS, len(ids) // width)
    return np.array(ids[: rows * width], np.int64).reshape(rows, width)


def teacher_forced(decoder: Decoder, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per predicted position: the model's top-1 token and its log-probability of the true one."""
    rows, width = tokens.shape
    decoder.arrange([None] * rows, rows * width)
    for b in range(rows):
        decoder.open_row(b)
    top, logprob = [], []
    for t in range(width - 1):
        logits = decoder.step(tokens[:, t])  # predicts token t + 1, seeing tokens 0..t
        top.append(np.argmax(logits, axis=-1))
        logprob.append(_log_softmax(logits)[np.arange(rows), tokens[:, t + 1]])
    for b in range(rows):
        decoder.close_row(b)
    return np.stack(top, axis=1), np.stack(logprob, axis=1)


def compare(fp32: Decoder, int8: Decoder, tokens: np.ndarray) -> QualityReport:
    top_fp32, logprob_fp32 = teacher_forced(fp32, tokens)
    top_int8, logprob_int8 = teacher_forced(int8, tokens)
    return judge(float(np.mean(top_fp32 == top_int8)), math.exp(-float(np.mean(logprob_fp32))),
                 math.exp(-float(np.mean(logprob_int8))), top_fp32.size)


def judge(agreement: float, perplexity_fp32: float, perplexity_int8: float, tokens: int) -> QualityReport:
    rise = perplexity_int8 / perplexity_fp32 - 1
    problems = []
    if agreement < MIN_AGREEMENT:
        problems.append(f"top-1 agreement {agreement:.4f} < {MIN_AGREEMENT}")
    if not rise < MAX_PERPLEXITY_RISE:
        problems.append(f"perplexity rises {rise:+.2%} (limit {MAX_PERPLEXITY_RISE:+.0%})")
    enabled = not problems
    reason = (f"int8 kept the model's quality: top-1 agreement {agreement:.4f}, perplexity {rise:+.2%}"
              if enabled else "int8 rejected: " + "; ".join(problems))
    return QualityReport(tokens, agreement, perplexity_fp32, perplexity_int8, rise, enabled, reason)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
