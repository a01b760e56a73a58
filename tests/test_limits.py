"""Limits: the body cap (413 before parsing), the total-token cap, bodies that are not JSON text,
the seed's bound, and that every status a route answers is in the OpenAPI document."""

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from conftest import served
from fakes import FakeEngine
from service.schemas import MAX_SEED
from test_api import fake_app, wait_ready


@pytest.fixture
def client(model_dir):
    app = fake_app(model_dir, FakeEngine(), max_body_bytes=2048, max_total_tokens=100, max_prompts_per_request=4,
                   max_queue_size=8)
    with TestClient(app) as client:
        wait_ready(client, timeout=5)
        yield client


OVER = "The request body is over this server's limit of 2048 bytes (MAX_BODY_BYTES)."


def test_a_body_over_the_cap_is_a_413_with_a_json_body(client):
    body = json.dumps({"prompts": "x" * 2100}).encode()
    r = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()) == (413, {"detail": OVER})
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()) == (413, {"error": {"message": OVER, "type": "invalid_request_error",
                                                        "param": None, "code": "request_too_large"}})
    fits = json.dumps({"prompts": "xy", "max_tokens": 2}).encode().ljust(2048)  # JSON may end in spaces
    r = client.post("/generate", content=fits, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()) == (200, {"results": ["yx"]})


def test_a_chunked_body_is_counted_as_it_arrives(model_dir):
    """No Content-Length: the read that passes the cap ends the request before any parsing."""
    app = fake_app(model_dir, FakeEngine(), max_body_bytes=2048)
    with served(app, ready_timeout=10) as url:
        def chunks(total):
            yield b'{"prompts": "y", "max_tokens": 2}'
            for _ in range(total // 100):
                yield b" " * 100

        for path, expected in (("/generate", {"detail": OVER}),
                               ("/v1/completions", {"error": {"message": OVER, "type": "invalid_request_error",
                                                              "param": None, "code": "request_too_large"}})):
            r = httpx.post(url + path, content=chunks(5000), headers={"content-type": "application/json"})
            assert "content-length" not in r.request.headers
            assert (r.status_code, r.json()) == (413, expected)
        r = httpx.post(url + "/generate", content=chunks(1000), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers
        assert (r.status_code, r.json()) == (200, {"results": ["y"]})


def test_more_new_tokens_than_max_total_tokens_is_refused_naming_the_field(client):
    r = client.post("/generate", json={"prompts": ["a", "b", "c"], "max_tokens": 34})
    assert r.status_code == 422
    assert r.json() == {"detail": [{
        "type": "too_many_tokens", "loc": ["body", "max_tokens"],
        "msg": "this request asks for 102 new tokens (3 rows x max_tokens 34), over this server's limit of 100 "
               "(MAX_TOTAL_TOKENS)", "input": 34, "ctx": {"limit": 100}}]}
    assert client.post("/generate", json={"prompts": ["a", "b", "c"], "max_tokens": 33}).status_code == 200
    model = client.get("/v1/models").json()["data"][0]["id"]
    r = client.post("/v1/completions", json={"model": model, "prompt": ["a", "b"], "n": 2, "max_tokens": 26})
    assert (r.status_code, r.json()) == (400, {"error": {
        "message": "this request asks for 104 new tokens (4 rows x max_tokens 26), over this server's limit of "
                   "100 (MAX_TOTAL_TOKENS)", "type": "invalid_request_error", "param": "max_tokens", "code": None}})
    r = client.post("/v1/completions", json={"model": model, "prompt": ["a", "b"], "n": 2, "max_tokens": 25})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


@pytest.mark.parametrize("body", [b"\xff\xfe\xfd", b'{"prompts": "\xff"}', b"\x80"])
def test_a_body_of_undecodable_bytes_is_fastapi_s_422(client, body):
    r = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422
    [error] = r.json()["detail"]
    assert error["type"] == "json_invalid" and error["msg"] == "JSON decode error" and error["loc"][0] == "body"
    assert error["ctx"]["error"].startswith("the body is not UTF-8, UTF-16 or UTF-32 text")
    r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("The body is not valid JSON: the body is not UTF-8")
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]["message"]) == (400, "The body is not valid JSON: Expecting property "
                                                                  "name enclosed in double quotes")
    assert client.post("/generate", json={"prompts": "ok", "max_tokens": 2}).status_code == 200


def test_non_json_content_types_get_a_422(client):
    r = client.post("/generate", content=b"prompts=abc", headers={"content-type": "text/plain"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"]


def test_the_seed_is_bounded_by_what_json_clients_hold_exactly(client):
    assert MAX_SEED == 2**53 - 1 == int(float(2**53 - 1))
    assert client.post("/generate", json={"prompts": "ab", "max_tokens": 2, "seed": MAX_SEED}).status_code == 200
    r = client.post("/generate", json={"prompts": "ab", "max_tokens": 2, "seed": MAX_SEED + 1})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "less_than_equal"
    assert r.json()["detail"][0]["loc"] == ["body", "seed"]
    model = client.get("/v1/models").json()["data"][0]["id"]
    ask = {"model": model, "prompt": "ab", "max_tokens": 2}
    assert client.post("/v1/completions", json=ask | {"seed": MAX_SEED}).status_code == 200
    for seed in (MAX_SEED + 1, -1):
        r = client.post("/v1/completions", json=ask | {"seed": seed})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    generate_ref = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    seed = schemas[generate_ref.split("/")[-1]]["properties"]["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["maximum"]) == (0, 2**53 - 1)
    seed = schemas["CompletionRequest"]["properties"]["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["maximum"]) == (0, 2**53 - 1)


def test_the_openapi_document_lists_every_status_with_its_body(client):
    spec = client.get("/openapi.json").json()
    generate = spec["paths"]["/generate"]["post"]["responses"]
    assert set(generate) == {"200", "413", "422", "499", "500", "503"}
    for status in ("413", "500", "503"):
        assert generate[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorMessage"}
    assert "Retry-After" in generate["503"]["headers"]
    completions = spec["paths"]["/v1/completions"]["post"]["responses"]
    # /v1 answers invalid requests 400 in OpenAI's envelope, never FastAPI's 422.
    assert set(completions) == {"200", "400", "404", "413", "429", "500", "503"}
    for status in set(completions) - {"200"}:
        assert completions[status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"}
    assert "Retry-After" in completions["429"]["headers"]
