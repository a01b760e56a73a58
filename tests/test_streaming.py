"""Streaming: incremental detokenization, the event stream of POST /generate, and clients that
go away. The real engines where text matters (both backends); the fake one, behind a real
uvicorn server, where a connection must really close."""

import json
from collections import Counter
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from conftest import served
from fakes import FakeEngine
from service.app import create_app
from service.detokenize import REPLACEMENT, IncrementalDetokenizer
from test_api import client, generate  # noqa: F401 (the client fixture)

UNICODE_PROMPTS = ["🎉🚀 emoji first, then 日本語のテキスト", "中文：你好，世界。", "naïve café — ünïcödé 👍🏽"]


def pieces_of(decode, ids, step=1):
    detokenizer = IncrementalDetokenizer(decode)
    pieces = [detokenizer.add(ids[i:i + step]) for i in range(0, len(ids), step)]
    return pieces + [detokenizer.flush()]


@pytest.mark.parametrize("text", UNICODE_PROMPTS)
def test_pieces_never_split_a_character_and_join_to_the_full_text(engine, text):
    ids = engine.encode(text)
    assert len(ids) > len(text.encode()) // 3  # byte-level tokens: many end inside a character
    pieces = pieces_of(engine.decode, ids)
    assert "".join(pieces) == engine.decode(ids) == text
    assert not any(REPLACEMENT in p for p in pieces)


def test_random_tokens_join_to_the_full_text_and_hold_back_only_what_it_has(engine):
    """Random byte-level tokens make invalid UTF-8 too: the pieces still join to the full text,
    and a piece carries U+FFFD only where the full text has one."""
    rng = np.random.default_rng(0)
    for trial in range(50):
        ids = [int(i) for i in rng.integers(0, engine.eos_id, size=int(rng.integers(1, 40)))]
        full = engine.decode(ids)
        for step in (1, 3):
            pieces = pieces_of(engine.decode, ids, step)
            assert "".join(pieces) == full, (trial, ids)
            assert sum(p.count(REPLACEMENT) for p in pieces) == full.count(REPLACEMENT)


def read_events(response):
    """The `data:` payloads of an event stream, JSON-decoded (the end marker as the string)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", line
    return events


def stream(client, **body):
    with client.stream("POST", "/generate", json=body | {"stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return read_events(r)


def test_streamed_pieces_join_to_the_unstreamed_results(client, engine):
    body = dict(prompts=UNICODE_PROMPTS, max_tokens=40, temperature=1.0, seed=5)
    events = stream(client, **body)
    assert events[-1] == "[DONE]"
    texts, finals = ["", "", ""], {}
    for e in events[:-1]:
        if "finish_reason" in e:
            assert e["index"] not in finals and e["text"] == ""
            finals[e["index"]] = e
        else:
            assert set(e) == {"index", "text"} and e["text"] and e["index"] not in finals
            assert REPLACEMENT not in e["text"] or REPLACEMENT in generate(client, **body).json()["results"][e["index"]]
            texts[e["index"]] += e["text"]
    assert texts == generate(client, **body).json()["results"]
    for i, prompt in enumerate(UNICODE_PROMPTS):
        final = finals[i]
        assert final["prompt_tokens"] == len(engine.encode(prompt))
        assert 0 <= final["generated_tokens"] <= 40
        assert final["finish_reason"] == ("length" if final["generated_tokens"] == 40 else "eos_token")


def test_a_greedy_stream_is_the_reference_and_ends_on_length(client, engine, reference):
    events = stream(client, prompts="def add(a, b):", max_tokens=12, temperature=0)
    text = "".join(e["text"] for e in events[:-1])
    assert text == engine.decode(reference("def add(a, b):", 12))
    assert events[-2] == {"index": 0, "text": "", "finish_reason": "length",
                          "prompt_tokens": len(engine.encode("def add(a, b):")), "generated_tokens": 12}


def test_without_stream_the_response_is_unchanged(client):
    r = generate(client, prompts="abc", max_tokens=3, temperature=0, stream=False)
    assert r.status_code == 200 and set(r.json()) == {"results"}
    r = generate(client, prompts="abc", max_tokens=3, stream="yes")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "stream"]


# --- Clients that go away ---------------------------------------------------------------------

class SlowFake(FakeEngine):
    """20 ms a decode call, so a request of 40 tokens takes most of a second."""

    def new_batch(self):
        batch = super().new_batch()
        step = batch.step
        batch.step = lambda: (time.sleep(0.02), step())[1]
        return batch


@pytest.fixture
def live_fake(model_dir):
    """A real uvicorn server on a loopback port, serving the slow fake engine."""
    from service.config import Settings

    engine = SlowFake()
    app = create_app(Settings(model_dir=model_dir, max_batch_size=4, batch_timeout_ms=0, max_tokens_limit=60),
                     engine_factory=lambda s: engine)
    with served(app, ready_timeout=10) as url:
        yield url, engine


def test_clients_that_disconnect_leave_the_batch_and_the_others_are_unchanged(live_fake):
    url, engine = live_fake
    staying_prompt = "s" * 40
    with ThreadPoolExecutor(1) as pool:
        staying = pool.submit(httpx.post, url + "/generate", json={"prompts": staying_prompt, "max_tokens": 40},
                              timeout=30)
        # A streaming client reads its first piece, then hangs up.
        with httpx.stream("POST", url + "/generate", json={"prompts": "b" * 40, "max_tokens": 40, "stream": True},
                          timeout=30) as r:
            assert r.status_code == 200
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            assert json.loads(first[6:]) == {"index": 0, "text": "b"}
        # A client that stops waiting for its (unstreamed) answer.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/generate", json={"prompts": "c" * 40, "max_tokens": 40}, timeout=0.15)
        assert staying.result().json() == {"results": [staying_prompt]}
    calls_per_row = Counter(key for keys in engine.calls for key in keys)
    # The staying row ran its 40 calls; the streamed and the unstreamed client's rows left long
    # before theirs.
    assert sorted(calls_per_row.values())[-1] == 40
    assert len(calls_per_row) == 3 and all(0 < n < 20 for n in sorted(calls_per_row.values())[:2])
    text = httpx.get(url + "/metrics").text
    assert "llm_rows_cancelled_total 2.0" in text


def test_a_stop_string_ends_the_text_before_it_streamed_or_not(client, engine, reference):
    full = engine.decode(reference("def add(a, b):", 120))
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2)
                if full[i:i + 2].strip() and full[i:i + 2] not in full[:i + 1])
    body = dict(prompts=["def add(a, b):"], max_tokens=120, temperature=0, stop=[stop, "\x00never"])
    r = generate(client, **body)
    assert r.status_code == 200 and r.json() == {"results": [full[:full.index(stop)]]}
    events = stream(client, **body)
    assert "".join(e["text"] for e in events[:-1]) == full[:full.index(stop)]
    final = events[-2]
    assert final["finish_reason"] == "stop_sequence" and final["generated_tokens"] < 120


def test_stop_takes_up_to_16_non_empty_strings(client):
    for stop in ([], [""], ["x"] * 17):
        r = generate(client, prompts="abc", max_tokens=3, stop=stop)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", "stop"], r.json()


def test_generate_takes_the_sampling_controls(client):
    body = dict(prompts=["Once upon", "import os"], max_tokens=10, temperature=1.0, seed=4, top_k=10, top_p=0.8,
                repetition_penalty=1.3)
    first = generate(client, **body)
    assert first.status_code == 200 and generate(client, **body).json() == first.json()
    for bad in (dict(top_k=-1), dict(top_p=0), dict(top_p=1.5), dict(repetition_penalty=0)):
        r = generate(client, prompts="x", max_tokens=2, **bad)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", next(iter(bad))]
