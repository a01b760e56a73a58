"""Shared fixtures: a tiny model built once, settings for it, and one warmed-up engine per backend.

`engine` is parametrized over the backends, so every test that uses it (the exactness tests,
the HTTP tests) runs on TensorFlow/XLA and on LiteRT (fp32: the tiny model's int8 weights fail
the quality gate). Compiling is the slow part, so one engine per backend serves the whole
session, and compiled XLA programs persist in a session directory.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
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
def llama_models(tmp_path_factory):
    """Tiny random-weight Llama, Llama with a SentencePiece tokenizer, Qwen2 and two saves of them,
    with transformers' results on each (tests/llama_models.py): built once by the PyTorch venv.
    Without that venv the tests that need it fail, saying why: they are not skipped."""
    import llama_models

    try:
        return llama_models.build(tmp_path_factory.mktemp("llama-models"))
    except llama_models.BuildError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def xla_cache(tmp_path_factory) -> Path:
    from service.engine.tf_gpt2 import use_persistent_compile_cache

    path = tmp_path_factory.mktemp("xla-cache")
    use_persistent_compile_cache(path)
    return path


@pytest.fixture(scope="session")
def litert_model_dir(model_dir, tmp_path_factory) -> Path:
    """The tiny model converted to LiteRT by scripts/convert_model.py (a copy: `model_dir` stays
    TensorFlow-only, so BACKEND=auto resolves to tf there). Its LM head is cut in 12 slices
    (a real model's size of slice would leave it whole), so that every exactness test reads
    logits joined from slices, in their order past the tenth."""
    import shutil

    import convert_model
    from service.engine import litert_convert

    out = tmp_path_factory.mktemp("tiny-litert") / "model"
    shutil.copytree(model_dir, out)
    whole = litert_convert.HEAD_SLICE_WEIGHTS
    litert_convert.HEAD_SLICE_WEIGHTS = 2_900  # the head is 512 x 64
    try:
        convert_model.convert_model_dir(out)
    finally:
        litert_convert.HEAD_SLICE_WEIGHTS = whole
    return out


@pytest.fixture(scope="session")
def tf_engine(model_dir, xla_cache):
    from service.engine.tf_gpt2 import TFGPT2Engine

    engine = TFGPT2Engine(model_dir, **ENGINE_OPTIONS)
    engine.warmup()
    return engine


@pytest.fixture(scope="session")
def litert_engine(litert_model_dir):
    from service.engine.litert_gpt2 import LiteRTGPT2Engine

    engine = LiteRTGPT2Engine(litert_model_dir, max_batch_size=ENGINE_OPTIONS["max_batch_size"],
                              smallest_cache=128)
    engine.warmup()
    return engine


@pytest.fixture(scope="session", params=["tf", "litert"])
def engine(request):
    return request.getfixturevalue(f"{request.param}_engine")


@pytest.fixture(scope="session")
def hf_model(model_dir):
    """transformers' own TF GPT-2 on the tiny model: the reference."""
    from transformers import TFGPT2LMHeadModel

    return TFGPT2LMHeadModel.from_pretrained(model_dir)


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
def reference(tf_engine, hf_model):
    """Greedy tokens from transformers' generate for (prompt text, max_tokens), cached."""
    cache: dict[tuple[str, int], list[int]] = {}

    def get(prompt: str, max_tokens: int) -> list[int]:
        key = (prompt, max_tokens)
        if key not in cache:
            ids = tf_engine.encode(prompt)
            cache[key] = reference_tokens(hf_model, ids, max_tokens, tf_engine.eos_id)
        return cache[key]

    return get


@contextmanager
def served(app, ready_timeout: float = 120):
    """`app` run by a real uvicorn server on a free loopback port, until the block ends; yields
    its base URL once /health answers 200 (for what only a real connection shows: disconnects,
    the official openai client)."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server did not become ready")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def served_engine(engine, model_dir: Path, served_model_name: str, **settings):
    """A warmed-up `engine` behind the app (the tests' engine options), on a live server."""
    from service.app import create_app
    from service.config import Settings

    options = dict(max_batch_size=ENGINE_OPTIONS["max_batch_size"], min_cache_size=ENGINE_OPTIONS["smallest_cache"],
                   served_model_name=served_model_name) | settings
    with served(create_app(Settings(model_dir=model_dir, **options), engine_factory=lambda s: engine)) as url:
        yield url
