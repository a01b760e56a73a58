"""Overload and clients that go away, against a real uvicorn server on loopback.

The stand-in engine decodes in 20 ms a call (tests/test_streaming.py's SlowFake), so the queue
fills for certain and every answer's text is known exactly (each prompt reversed)."""

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import served
from service.app import create_app
from test_streaming import SlowFake

QUEUE = 4


def live_server(model_dir, **options):
    from service.config import Settings

    engine = SlowFake()
    settings = Settings(model_dir=model_dir, batch_timeout_ms=0, max_tokens_limit=60, **options)
    return served(create_app(settings, engine_factory=lambda s: engine), ready_timeout=10), engine


@pytest.fixture
def live(model_dir):
    server, engine = live_server(model_dir, max_batch_size=2, max_queue_size=QUEUE)
    with server as url:
        yield url, engine


@pytest.fixture
def live_wide(model_dir):
    server, engine = live_server(model_dir, max_batch_size=8)
    with server as url:
        yield url, engine


def metric_lines(url):
    return httpx.get(url + "/metrics").text.splitlines()


def metric(url, name):
    return next(float(line.split()[-1]) for line in metric_lines(url) if line.split(" ")[0] == name)


def test_far_more_clients_than_the_queue_holds(live):
    """Every answer is a success with the right text, or a refusal with Retry-After (503 on
    /generate, OpenAI's 429 on /v1); nothing else, nothing lost, and the server serves after."""
    url, engine = live
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    clients = 48

    def one(i):
        prompt = f"p{chr(97 + i % 26)}{chr(97 + i // 26)}xyz"  # no "0": the fake engine's end-of-text
        kind = ("generate", "stream", "v1")[i % 3]
        with httpx.Client(base_url=url, timeout=60) as http:
            if kind == "generate":
                r = http.post("/generate", json={"prompts": prompt, "max_tokens": 6})
                return kind, prompt, r.status_code, r.headers.get("retry-after"), r.json()
            if kind == "stream":
                with http.stream("POST", "/generate", json={"prompts": prompt, "max_tokens": 6, "stream": True}) as r:
                    body = r.read().decode()
                    return kind, prompt, r.status_code, r.headers.get("retry-after"), body
            r = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 6})
            return kind, prompt, r.status_code, r.headers.get("retry-after"), r.json()

    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(one, range(clients)))
    refused = Counter()
    for kind, prompt, status, retry_after, body in answers:
        expected = prompt[::-1]
        if status == 200:
            if kind == "generate":
                assert body == {"results": [expected]}
            elif kind == "stream":
                events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                pieces = [json.loads(e) for e in events[:-1]]
                assert "".join(p["text"] for p in pieces) == expected
                assert pieces[-1]["finish_reason"] == "length"
            else:
                assert body["choices"][0]["text"] == expected and body["usage"]["completion_tokens"] == 6
            continue
        refused[kind] += 1
        assert (status, retry_after) == ((429, "1") if kind == "v1" else (503, "1")), (kind, status, body)
        if kind == "v1":
            assert body["error"]["type"] == "server_overloaded" and body["error"]["message"].startswith("server busy")
        elif kind == "generate":
            assert body["detail"].startswith("server busy")
    served_ok = clients - sum(refused.values())
    # With 2 rows decoding and 4 waiting, most of 48 simultaneous clients are refused; the rest finish.
    assert sum(refused.values()) >= clients // 2 and served_ok >= 2 + QUEUE, refused
    # The server serves normally afterwards, with nothing left queued or running.
    assert httpx.post(url + "/generate", json={"prompts": "after", "max_tokens": 5}).json() == {"results": ["retfa"]}
    assert httpx.get(url + "/health").status_code == 200
    assert metric(url, "llm_queue_prompts") == 0 and metric(url, "llm_running_prompts") == 0
    assert metric(url, "llm_rows_cancelled_total") == 0
    statuses = Counter()
    for line in metric_lines(url):
        if line.startswith("llm_http_requests_total{") and 'method="POST"' in line:
            statuses[line.split('status="')[1].split('"')[0]] += float(line.split()[-1])
    assert statuses == {"200": served_ok + 1, "503": refused["generate"] + refused["stream"], "429": refused["v1"]}


def test_v1_clients_that_disconnect_leave_the_batch_and_the_rest_completes(live_wide):
    """tests/test_streaming.py covers /generate; here /v1, with n = 2 rows a request."""
    url, engine = live_wide
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    staying_prompt = "s" * 40
    with ThreadPoolExecutor(1) as pool:
        staying = pool.submit(httpx.post, url + "/v1/completions", timeout=30,
                              json={"model": model, "prompt": staying_prompt, "max_tokens": 40})
        with httpx.stream("POST", url + "/v1/completions", timeout=30,
                          json={"model": model, "prompt": "b" * 40, "max_tokens": 40, "n": 2, "stream": True}) as r:
            assert r.status_code == 200
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["text"] == "b"
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", timeout=0.15,
                       json={"model": model, "prompt": "c" * 40, "max_tokens": 40, "n": 2})
        answer = staying.result().json()
    assert answer["choices"][0]["text"] == staying_prompt and answer["usage"]["completion_tokens"] == 40
    calls_per_row = Counter(key for keys in engine.calls for key in keys)
    assert sorted(calls_per_row.values())[-1] == 40 and len(calls_per_row) == 5
    assert all(0 < n < 20 for n in sorted(calls_per_row.values())[:4])  # the 4 rows that left
    deadline = time.monotonic() + 5
    while metric(url, "llm_rows_cancelled_total") < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, "llm_rows_cancelled_total") == 4
    assert metric(url, "llm_running_prompts") == 0
    lines = metric_lines(url)
    # The unstreamed client that left is recorded as 499 (nobody read it); the stream had its 200.
    assert 'llm_http_requests_total{method="POST",route="/v1/completions",status="499"} 1.0' in lines
    assert 'llm_http_requests_total{method="POST",route="/v1/completions",status="200"} 2.0' in lines
    assert httpx.post(url + "/generate", json={"prompts": "ok", "max_tokens": 2}).json() == {"results": ["ko"]}
