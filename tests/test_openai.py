"""The /v1 API through the official `openai` client against a live server, on both backends."""

import threading
import time

import httpx
import openai
import pytest

from conftest import served, served_engine
from fakes import FakeEngine
from service.app import create_app

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def live(engine, model_dir):
    with served_engine(engine, model_dir, "tiny-gpt2", max_tokens_limit=1000) as url:
        yield url


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live + "/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-gpt2"]
    assert models.data[0].object == "model" and models.data[0].owned_by == "local"


def test_a_greedy_completion_is_the_reference(client, engine, reference):
    r = client.completions.create(model="tiny-gpt2", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny-gpt2"
    assert [(c.index, c.text, c.finish_reason, c.logprobs) for c in r.choices] == [
        (0, engine.decode(reference(PROMPT, 12)), "length", None)]
    prompt_tokens = len(engine.encode(PROMPT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        prompt_tokens, 12, prompt_tokens + 12)


def test_token_id_prompts_equal_their_text(client, engine):
    ids = engine.encode(PROMPT)
    by_text = client.completions.create(model="tiny-gpt2", prompt=[PROMPT, "x"], max_tokens=8, temperature=0)
    by_ids = client.completions.create(model="tiny-gpt2", prompt=[ids, engine.encode("x")], max_tokens=8,
                                       temperature=0)
    one = client.completions.create(model="tiny-gpt2", prompt=ids, max_tokens=8, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert one.choices[0].text == by_text.choices[0].text


def test_n_choices_are_prompt_major_and_reproducible_with_a_seed(client):
    ask = dict(model="tiny-gpt2", prompt=["Once upon", "import os"], max_tokens=10, temperature=1.0, n=3, seed=11)
    first, again = client.completions.create(**ask), client.completions.create(**ask)
    assert [c.index for c in first.choices] == list(range(6))
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices[:3]}) > 1  # each sample its own random stream
    single = client.completions.create(**(ask | {"prompt": "Once upon"}))
    # Choice index = prompt index * n + j, and the stream follows the index.
    assert [c.text for c in single.choices] == [c.text for c in first.choices[:3]]


def test_a_stop_string_ends_the_text_before_it_and_stops_the_row(client, engine, reference):
    full = engine.decode(reference(PROMPT, 200))
    stop = next(full[i:i + 3] for i in range(4, len(full) - 3) if full[i:i + 3].strip() and full[i:i + 3] not in full[:i + 2])
    r = client.completions.create(model="tiny-gpt2", prompt=PROMPT, max_tokens=200, temperature=0,
                                  stop=["never appears \x00", stop])
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 200  # the row stopped generating


def test_a_stream_joins_to_the_unstreamed_completion_and_ends_with_usage(client):
    ask = dict(model="tiny-gpt2", prompt=["🎉 emoji", "日本語"], max_tokens=20, temperature=0.9, seed=3, n=2)
    whole = client.completions.create(**ask)
    chunks = list(client.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    texts, finish = [""] * 4, [None] * 4
    for chunk in chunks[:-1]:
        assert chunk.object == "text_completion" and len(chunk.choices) == 1
        choice = chunk.choices[0]
        texts[choice.index] += choice.text
        finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert texts == [c.text for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_unknown_fields_are_ignored(client):
    r = client.completions.create(model="tiny-gpt2", prompt="x", max_tokens=2, temperature=0,
                                  user="someone", best_of=1, logit_bias={}, extra_body={"whatever": [1, 2]})
    assert len(r.choices) == 1


@pytest.mark.parametrize("ask, param", [
    (dict(logprobs=6), "logprobs"),
    (dict(top_p=0), "top_p"),
    (dict(extra_body={"top_k": -2}), "top_k"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(best_of=2), "best_of"),
    (dict(logit_bias={"5": 1.0}), "logit_bias"),
    (dict(suffix="end"), "suffix"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=5000), "max_tokens"),
    (dict(temperature=9.0), "temperature"),
    (dict(stop=[""]), "stop"),
    (dict(prompt=[[]]), "prompt"),
    (dict(prompt=[10**9]), "prompt"),
    (dict(extra_body={"n": "two"}), "n"),
])
def test_a_field_that_cannot_be_honoured_is_a_400_naming_it(client, ask, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**({"model": "tiny-gpt2", "prompt": "x", "max_tokens": 2} | ask))
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param, caught.value.body
    assert caught.value.body["type"] == "invalid_request_error"


def test_a_prompt_too_long_for_the_context_is_a_400(client, engine):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny-gpt2", prompt=[1] * 1000, max_tokens=100)
    assert caught.value.body["code"] == "context_length_exceeded"
    assert "1100 tokens (1000 in your prompt; 100 for the completion)" in caught.value.body["message"]
    # Exactly the context window is accepted.
    r = client.completions.create(model="tiny-gpt2", prompt=[1] * 1020, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == 1020


def test_another_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="x")
    assert caught.value.body["code"] == "model_not_found"


def test_a_full_queue_is_a_429_with_retry_after(model_dir):
    from service.config import Settings

    engine = FakeEngine()
    app = create_app(Settings(model_dir=model_dir, max_batch_size=1, max_queue_size=1, served_model_name="fake"),
                     engine_factory=lambda s: engine)
    with served(app) as url:
        engine.generate_gate.clear()
        try:
            queue_full(url, engine)
        finally:
            engine.generate_gate.set()


def queue_full(url, engine):
    """One request held at the gate, one queued: the third is refused."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
    pool = [threading.Thread(target=client.completions.create, kwargs=dict(model="fake", prompt=p, max_tokens=2))
            for p in ("ab", "cd")]
    for t in pool:
        t.start()
        time.sleep(0.2)  # the first runs (held at the gate), the second waits in the queue
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model="fake", prompt="ef", max_tokens=2)
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.body["type"] == "server_overloaded"
    # The refused request is not counted as accepted.
    metrics = httpx.get(url + "/metrics").text
    assert "\nllm_requests_total 2.0\n" in metrics and "\nllm_prompt_tokens_total 4.0\n" in metrics
    engine.generate_gate.set()
    for t in pool:
        t.join(10)
    assert client.completions.create(model="fake", prompt="gh", max_tokens=2).choices[0].text == "hg"


def log_softmax(x):
    import numpy as np

    x = x.astype(np.float64) - x.max()
    return x - np.log(np.exp(x).sum())


def test_echo_with_logprobs_scores_the_prompt_as_transformers_does(client, engine, hf_model):
    """What evaluation harnesses do: send context + continuation as token ids, echo them back
    with their log-probabilities, generate nothing, and sum."""
    import numpy as np
    import tensorflow as tf

    ids = engine.encode(PROMPT + " return a + b")
    r = client.completions.create(model="tiny-gpt2", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == engine.decode(ids) and r.usage.completion_tokens == 0
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    reference = hf_model(tf.constant([ids])).logits.numpy()[0]
    for i in range(1, len(ids)):
        expected = log_softmax(reference[i - 1])
        assert abs(lp.token_logprobs[i] - expected[ids[i]]) < 1e-4
        best = int(np.argmax(expected))
        assert abs(lp.top_logprobs[i][engine.decode([best])] - expected[best]) < 1e-4
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    # With one new token: one more entry, after the prompt's.
    r = client.completions.create(model="tiny-gpt2", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert len(r.choices[0].logprobs.tokens) == len(ids) + 1
    assert r.choices[0].logprobs.token_logprobs[:len(ids)] == lp.token_logprobs


def test_generated_logprobs_are_the_same_streamed_or_not(client):
    """(The engine tests compare the numbers with transformers.)"""
    ask = dict(model="tiny-gpt2", prompt=PROMPT, max_tokens=8, temperature=0.8, seed=5, logprobs=2)
    r = client.completions.create(**ask)
    lp = r.choices[0].logprobs
    streamed = [c.choices[0].logprobs for c in client.completions.create(**ask, stream=True)]
    assert sum((s.token_logprobs for s in streamed if s), []) == lp.token_logprobs
    assert sum((s.tokens for s in streamed if s), []) == lp.tokens
    assert len(lp.tokens) >= r.usage.completion_tokens  # end-of-text, if generated, has its entry
    assert all(len(top) <= 3 for top in lp.top_logprobs)  # the top 2 and the chosen token
    assert lp.text_offset[0] == len(PROMPT)
    assert "".join(lp.tokens)[:len(r.choices[0].text)] == r.choices[0].text


def test_top_k_top_p_and_repetition_penalty_are_seeded_and_reproducible(client):
    ask = dict(model="tiny-gpt2", prompt="Once upon", max_tokens=12, temperature=1.0, top_p=0.7, seed=21,
               extra_body={"top_k": 20, "repetition_penalty": 1.2})
    assert client.completions.create(**ask).choices[0].text == client.completions.create(**ask).choices[0].text


def test_a_failed_generation_is_a_500_and_the_server_goes_on(model_dir):
    from service.config import Settings

    engine = FakeEngine(fail_with=RuntimeError("out of cheese"))
    app = create_app(Settings(model_dir=model_dir, served_model_name="fake"), engine_factory=lambda s: engine)
    with served(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as caught:
            client.completions.create(model="fake", prompt="ab", max_tokens=2)
        assert caught.value.status_code == 500
        assert caught.value.body == {"message": "generation failed: out of cheese", "type": "server_error",
                                     "param": None, "code": None}
        engine.fail_with = None
        assert client.completions.create(model="fake", prompt="ab", max_tokens=2).choices[0].text == "ba"


def test_a_request_while_loading_is_a_503_with_retry_after(model_dir):
    from fastapi.testclient import TestClient

    from service.config import Settings

    engine = FakeEngine()
    engine.warmup_gate.clear()
    app = create_app(Settings(model_dir=model_dir, served_model_name="fake"), engine_factory=lambda s: engine)
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", max_retries=0, http_client=http)
        with pytest.raises(openai.InternalServerError) as caught:
            client.completions.create(model="fake", prompt="ab", max_tokens=2)
        assert caught.value.status_code == 503 and caught.value.response.headers["retry-after"] == "5"
        assert caught.value.body["type"] == "service_unavailable"
        engine.warmup_gate.set()
