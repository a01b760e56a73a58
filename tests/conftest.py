"""Shared fixtures: a tiny model built once, settings for it, and one warmed-up engine.

Compiling is the slow part of these tests, so one TensorFlow engine serves the whole session
(the HTTP tests hand it to the app factory) and compiled programs persist in a session
directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

# Small shapes: batch buckets 1, 4 and cache buckets 512, 1040.
ENGINE_OPTIONS = dict(max_batch_size=4, prefill_chunk=16, decode_chunk=16, smallest_cache=512)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    import make_test_model

    out = tmp_path_factory.mktemp("tiny-model")
    make_test_model.main(["--out", str(out), "--shape", "tiny"])
    return out


@pytest.fixture(scope="session")
def xla_cache(tmp_path_factory) -> Path:
    from service.engine.tf_gpt2 import use_persistent_compile_cache

    path = tmp_path_factory.mktemp("xla-cache")
    use_persistent_compile_cache(path)
    return path


@pytest.fixture(scope="session")
def engine(model_dir, xla_cache):
    from service.engine.tf_gpt2 import TFGPT2Engine

    engine = TFGPT2Engine(model_dir, **ENGINE_OPTIONS)
    engine.warmup()
    return engine


@pytest.fixture
def settings(model_dir):
    from service.config import Settings

    return Settings(
        model_dir=model_dir,
        max_batch_size=ENGINE_OPTIONS["max_batch_size"],
        min_cache_size=ENGINE_OPTIONS["smallest_cache"],
        batch_timeout_ms=20,
        max_prompts_per_request=8,
        max_tokens_limit=1000,
        max_temperature=2.0,
    )


def reference_tokens(model, prompt_ids, max_new_tokens: int, eos_id: int) -> list[int]:
    """transformers' own TF `generate`, greedy, on one prompt alone; new tokens before end-of-text."""
    import tensorflow as tf

    out = model.generate(tf.constant([list(prompt_ids)]), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=eos_id, attention_mask=tf.ones([1, len(prompt_ids)], tf.int32))
    new = [int(t) for t in out.numpy()[0][len(prompt_ids):]]
    return new[: new.index(eos_id)] if eos_id in new else new


@pytest.fixture(scope="session")
def reference(engine):
    """Greedy tokens from transformers' generate for (prompt text, max_tokens), cached."""
    cache: dict[tuple[str, int], list[int]] = {}

    def get(prompt: str, max_tokens: int) -> list[int]:
        key = (prompt, max_tokens)
        if key not in cache:
            cache[key] = reference_tokens(engine.model, engine.encode(prompt), max_tokens, engine.eos_id)
        return cache[key]

    return get
