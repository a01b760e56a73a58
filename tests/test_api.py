"""The HTTP contract: status codes and bodies, batching across requests, errors that leave the
server serving. The real engine (shared, warmed up) where output matters; a fake one to hold
the server in a state (loading, busy, failing)."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from fakes import FakeEngine
from service.app import create_app


@pytest.fixture(scope="module")
def client(engine, model_dir):
    from service.config import Settings
    from conftest import ENGINE_OPTIONS

    settings = Settings(model_dir=model_dir, max_batch_size=ENGINE_OPTIONS["max_batch_size"],
                        min_cache_size=ENGINE_OPTIONS["smallest_cache"], batch_timeout_ms=50,
                        max_prompts_per_request=8, max_tokens_limit=1000, max_temperature=2.0)
    with TestClient(create_app(settings, engine_factory=lambda s: engine)) as client:
        wait_ready(client)
        yield client


def wait_ready(client, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("server did not become ready")


def generate(client, **body):
    return client.post("/generate", json=body)


def text_of(engine, tokens):
    return engine.decode(tokens)


def test_health_ok(client, engine):
    r = client.get("/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok", "backend": engine.backend, "precision": "fp32"})


def test_greedy_results_are_the_reference_continuations_in_order(client, engine, reference):
    prompts = ["def f(x):", "", "Hello, world"]
    r = generate(client, prompts=prompts, max_tokens=12, temperature=0)
    assert r.status_code == 200
    assert r.json() == {"results": [text_of(engine, reference(p, 12)) for p in prompts]}


def test_a_single_string_prompt_gives_one_result(client, engine, reference):
    r = generate(client, prompts="import os", max_tokens=5, temperature=0.0)
    assert r.json() == {"results": [text_of(engine, reference("import os", 5))]}


def test_defaults_are_128_tokens_at_temperature_1(client):
    implicit = generate(client, prompts="x", seed=5).json()
    explicit = generate(client, prompts="x", seed=5, max_tokens=128, temperature=1.0).json()
    other = generate(client, prompts="x", seed=5, max_tokens=127, temperature=1.0).json()
    assert implicit == explicit
    assert implicit != other


def test_seeded_sampling_is_reproducible_per_prompt_position(client):
    body = dict(prompts=["a", "a"], max_tokens=20, temperature=1.0, seed=42)
    first, second = generate(client, **body).json(), generate(client, **body).json()
    assert first == second
    assert first["results"][0] != first["results"][1]  # prompt i draws from stream (seed, i)


def test_unicode_and_emoji_round_trip(client):
    r = client.post("/generate", content=json.dumps({"prompts": ["héllo wörld 🎉 日本"], "max_tokens": 4,
                                                     "temperature": 0}, ensure_ascii=False).encode(),
                    headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200
    assert isinstance(r.json()["results"][0], str)


def test_concurrent_requests_are_batched_and_each_gets_its_reference(client, engine, reference):
    prompts = ["a", "bb bb", "class A:\n    pass", "for i in range(10):", "x = 1", "The end."]
    calls_before = metric(client, "llm_decode_calls_total")
    with ThreadPoolExecutor(len(prompts)) as pool:
        responses = list(pool.map(lambda p: generate(client, prompts=p, max_tokens=10 + len(p), temperature=0),
                                  prompts))
    assert [r.status_code for r in responses] == [200] * len(prompts)
    assert [r.json()["results"][0] for r in responses] == [text_of(engine, reference(p, 10 + len(p)))
                                                           for p in prompts]
    # Rows shared decode calls: fewer calls than tokens.
    assert metric(client, "llm_decode_calls_total") - calls_before < sum(10 + len(p) for p in prompts)


def metric(client, name):
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_metrics_report_no_compiles_after_warmup(client):
    generate(client, prompts=["one", "two", "three"], max_tokens=3)
    assert metric(client, "llm_compiles_after_warmup_total") == 0
    assert metric(client, "llm_ready") == 1
    assert metric(client, "llm_generated_tokens_total") > 0


BAD_BODIES = [
    ({}, "missing", ["body", "prompts"]),
    ({"prompts": []}, "too_short", ["body", "prompts", "list[str]"]),
    ({"prompts": 123}, "string_type", ["body", "prompts", "str"]),
    ({"prompts": ["ok", 5]}, "string_type", ["body", "prompts", "list[str]", 1]),
    ({"prompts": ["p"] * 9}, "too_long", ["body", "prompts", "list[str]"]),
    ({"prompts": "p", "max_tokens": 0}, "greater_than_equal", ["body", "max_tokens"]),
    ({"prompts": "p", "max_tokens": 1001}, "less_than_equal", ["body", "max_tokens"]),
    ({"prompts": "p", "max_tokens": "5"}, "int_type", ["body", "max_tokens"]),
    ({"prompts": "p", "max_tokens": 2.5}, "int_type", ["body", "max_tokens"]),
    ({"prompts": "p", "temperature": -0.1}, "greater_than_equal", ["body", "temperature"]),
    ({"prompts": "p", "temperature": 2.01}, "less_than_equal", ["body", "temperature"]),
    ({"prompts": "p", "temperature": "hot"}, "float_type", ["body", "temperature"]),
    ({"prompts": "p", "seed": -1}, "greater_than_equal", ["body", "seed"]),
    ({"prompts": "p", "max_token": 5}, "extra_forbidden", ["body", "max_token"]),
]


@pytest.mark.parametrize("body, error_type, loc", BAD_BODIES, ids=[json.dumps(b)[:40] for b, _, _ in BAD_BODIES])
def test_bad_bodies_get_422_saying_what_is_wrong(client, body, error_type, loc):
    r = generate(client, **body)
    assert r.status_code == 422
    errors = r.json()["detail"]
    assert {"type": error_type, "loc": loc} in [{"type": e["type"], "loc": e["loc"]} for e in errors]
    assert generate(client, prompts="still serving", max_tokens=2, temperature=0).status_code == 200


def test_integer_temperature_and_non_json_bodies(client):
    assert generate(client, prompts="p", max_tokens=2, temperature=0).status_code == 200
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["type"] == "json_invalid"
    r = client.post("/generate", content=b"NaN", headers={"content-type": "application/json"})
    assert r.status_code == 422
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        r = client.post("/generate", content=b'{"prompts": "p", "temperature": %s}' % constant,
                        headers={"content-type": "application/json"})
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["body", "temperature"]


def test_a_prompt_too_long_for_the_window_says_which_and_by_how_much(client, engine):
    long_prompt = "word " * 600
    n = len(engine.encode(long_prompt))
    assert n > 600
    r = generate(client, prompts=["short", long_prompt], max_tokens=1000 - 600)
    assert r.status_code == 422
    excess = n + 400 - 1024
    assert r.json() == {"detail": [{
        "type": "prompt_too_long", "loc": ["body", "prompts", 1],
        "msg": f"prompt 1 has {n} tokens; with max_tokens=400 that is {n + 400}, {excess} more than "
               f"the model's context window of 1024 tokens",
        "ctx": {"excess_tokens": excess}}]}
    assert generate(client, prompts="fits", max_tokens=3, temperature=0).status_code == 200


def test_a_prompt_that_exactly_fills_the_window_is_served(client, engine):
    ids_prompt = "z " * 1200
    n = len(engine.encode(ids_prompt))
    r = generate(client, prompts=ids_prompt, max_tokens=1)
    assert n + 1 > 1024 and r.status_code == 422
    text = "z " * 500
    n = len(engine.encode(text))
    r = generate(client, prompts=text, max_tokens=1024 - n, temperature=0)
    assert r.status_code == 200


def test_openapi_docs_show_the_contract_with_examples(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body_ref = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = spec["components"]["schemas"][body_ref.split("/")[-1]]
    assert schema["examples"][0] == {"prompts": "The quick brown fox", "max_tokens": 16, "temperature": 0}
    assert schema["properties"]["max_tokens"]["maximum"] == 1000
    assert {"200", "422", "503"} <= set(spec["paths"]["/generate"]["post"]["responses"])


# --- Server states, held with a fake engine ---------------------------------------------------

def fake_app(model_dir, engine, **overrides):
    from service.config import Settings

    options = dict(model_dir=model_dir, max_batch_size=2, batch_timeout_ms=0, max_queue_size=2,
                   max_prompts_per_request=4, max_tokens_limit=50) | overrides
    return create_app(Settings(**options), engine_factory=lambda s: engine)


def test_loading_answers_503_until_warm(model_dir):
    engine = FakeEngine()
    engine.warmup_gate.clear()
    with TestClient(fake_app(model_dir, engine)) as client:
        r = client.get("/health")
        assert (r.status_code, r.json()) == (503, {"status": "loading", "backend": "fake", "precision": "fp32"})
        r = generate(client, prompts="abc")
        assert (r.status_code, r.json()) == (503, {"detail": "the model is not ready: it is still loading"})
        assert r.headers["retry-after"] == "5"
        engine.warmup_gate.set()
        wait_ready(client, timeout=5)
        assert generate(client, prompts="abc").json() == {"results": ["cba"]}


def test_a_full_queue_answers_503_with_retry_after_and_recovers(model_dir):
    engine = FakeEngine()
    with TestClient(fake_app(model_dir, engine)) as client:
        wait_ready(client, timeout=5)
        engine.generate_gate.clear()
        with ThreadPoolExecutor(2) as pool:
            busy = pool.submit(generate, client, prompts=["ab", "cd"])  # the running batch
            assert engine.generating.wait(5)
            queued = pool.submit(generate, client, prompts=["ef", "gh"])  # fills the queue of 2
            deadline = time.monotonic() + 5
            while metric(client, "llm_queue_prompts") < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = generate(client, prompts="ij")
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert r.json() == {"detail": "server busy: 2 prompts are waiting and this request adds 1, "
                                          "over the queue bound of 2; retry later"}
            engine.generate_gate.set()
            assert busy.result().json() == {"results": ["ba", "dc"]}
            assert queued.result().json() == {"results": ["fe", "hg"]}
        assert generate(client, prompts="ij").json() == {"results": ["ji"]}


def test_metrics_count_what_users_feel(model_dir):
    with TestClient(fake_app(model_dir, FakeEngine())) as client:
        wait_ready(client, timeout=5)
        before = {name: metric(client, name) for name in HISTOGRAM_COUNTS}
        assert generate(client, prompts=["abc", "de"], max_tokens=5).json() == {"results": ["cba", "ed"]}
        text = client.get("/metrics").text
        for name in HISTOGRAM_COUNTS:  # one observation per prompt
            assert metric(client, name) - before[name] == 2, name
        assert 'llm_time_to_first_token_seconds_bucket{le="+Inf"}' in text
        assert metric(client, "llm_requests_total") == 1
        assert metric(client, "llm_generated_tokens_total") == 5
        assert metric(client, "llm_rows_cancelled_total") == 0


HISTOGRAM_COUNTS = ("llm_queue_wait_seconds_count", "llm_time_to_first_token_seconds_count",
                    "llm_time_per_output_token_seconds_count")


def test_an_engine_failure_is_a_500_with_a_body_and_the_server_goes_on(model_dir):
    engine = FakeEngine(fail_with=RuntimeError("out of cheese"))
    with TestClient(fake_app(model_dir, engine)) as client:
        wait_ready(client, timeout=5)
        r = generate(client, prompts="abc")
        assert (r.status_code, r.json()) == (500, {"detail": "generation failed: out of cheese"})
        engine.fail_with = None
        assert generate(client, prompts="abc").json() == {"results": ["cba"]}


def test_shutdown_finishes_requests_in_flight(model_dir):
    engine = FakeEngine()
    with ThreadPoolExecutor(1) as pool:
        with TestClient(fake_app(model_dir, engine)) as client:
            wait_ready(client, timeout=5)
            engine.generate_gate.clear()
            in_flight = pool.submit(generate, client, prompts="xyz")
            assert engine.generating.wait(5)
            threading.Timer(0.2, engine.generate_gate.set).start()
        assert in_flight.result().json() == {"results": ["zyx"]}
