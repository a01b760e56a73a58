"""Access control (API keys) and CORS, over the HTTP contract; the official openai client against
a live server. A stand-in engine: nothing here depends on the model."""

import openai
import pytest
from fastapi.testclient import TestClient

from conftest import served
from fakes import FakeEngine
from service.config import Settings
from service.security import key_matches
from test_api import fake_app, wait_ready

KEYS = ("key-one-0123456789", "key-two-abcdefghij")
BODY = {"prompts": "abc", "max_tokens": 3}


@pytest.fixture
def keyed_client(model_dir, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text(f"# the second key\n\n  {KEYS[1]}  \n")
    with TestClient(fake_app(model_dir, FakeEngine(), api_key=f" {KEYS[0]} ,", api_key_file=key_file)) as client:
        wait_ready(client, timeout=5)
        yield client


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def test_every_key_from_api_key_and_the_file_is_accepted(keyed_client):
    for key in KEYS:
        r = keyed_client.post("/generate", json=BODY, headers=bearer(key))
        assert (r.status_code, r.json()) == (200, {"results": ["cba"]})
        assert keyed_client.get("/v1/models", headers=bearer(key)).status_code == 200
    # The scheme is case-insensitive (RFC 9110).
    assert keyed_client.post("/generate", json=BODY, headers={"Authorization": f"bearer {KEYS[0]}"}).status_code == 200


NO_KEY = [{}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": KEYS[0]}]
WRONG_KEY = [bearer("key-one-012345678"), bearer(KEYS[0] + "x"), bearer("sk-" + KEYS[0]), bearer(KEYS[0].upper())]


@pytest.mark.parametrize("headers", NO_KEY + WRONG_KEY)
def test_generate_without_a_valid_key_is_a_401_with_a_json_body(keyed_client, headers):
    r = keyed_client.post("/generate", json=BODY, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    message = ("Missing API key: send it in the header 'Authorization: Bearer <key>'." if headers in NO_KEY
               else "Incorrect API key provided.")
    assert r.json() == {"detail": message}


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/completions"),
                                          ("GET", "/v1/nothing-here")])
def test_v1_without_a_valid_key_is_openai_s_401(keyed_client, method, path):
    for headers, message in ((NO_KEY[0], "Missing API key: send it in the header 'Authorization: Bearer <key>'."),
                             (WRONG_KEY[0], "Incorrect API key provided.")):
        r = keyed_client.request(method, path, json={"model": "x", "prompt": "y"}, headers=headers)
        assert r.status_code == 401
        assert r.json() == {"error": {"message": message, "type": "invalid_request_error", "param": None,
                                      "code": "invalid_api_key"}}


def test_the_key_is_checked_before_the_body_is_read(keyed_client):
    r = keyed_client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401
    r = keyed_client.post("/generate", content=b"{not json", headers={"content-type": "application/json"} | bearer(KEYS[1]))
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"


def test_health_docs_and_metrics_stay_open(keyed_client):
    assert keyed_client.get("/health").status_code == 200
    assert keyed_client.get("/openapi.json").status_code == 200
    assert keyed_client.get("/docs").status_code == 200
    assert keyed_client.get("/metrics").status_code == 200


def test_metrics_can_require_the_key(model_dir):
    with TestClient(fake_app(model_dir, FakeEngine(), api_key=KEYS[0], metrics_require_key=True)) as client:
        wait_ready(client, timeout=5)
        assert client.get("/health").status_code == 200
        r = client.get("/metrics")
        assert (r.status_code, r.json()) == (
            401, {"detail": "Missing API key: send it in the header 'Authorization: Bearer <key>'."})
        r = client.get("/metrics", headers=bearer(KEYS[0]))
        assert r.status_code == 200 and "llm_ready 1.0" in r.text
        paths = client.get("/openapi.json").json()["paths"]
        assert paths["/metrics"]["get"]["security"] == [{"APIKey": []}]
        assert "401" in paths["/metrics"]["get"]["responses"]


def test_without_keys_any_or_no_authorization_is_accepted(model_dir):
    with TestClient(fake_app(model_dir, FakeEngine())) as client:
        wait_ready(client, timeout=5)
        for headers in ({}, bearer("anything"), {"Authorization": "Basic xyz"}):
            assert client.post("/generate", json=BODY, headers=headers).json() == {"results": ["cba"]}
        spec = client.get("/openapi.json").json()
        assert "securitySchemes" not in spec.get("components", {})
        assert "401" not in spec["paths"]["/generate"]["post"]["responses"]


def test_the_openapi_document_declares_the_key_where_it_is_needed(keyed_client):
    spec = keyed_client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["APIKey"] == {
        "type": "http", "scheme": "bearer",
        "description": "`Authorization: Bearer <key>`, one of API_KEY's or API_KEY_FILE's keys."}
    for path, method in (("/generate", "post"), ("/v1/models", "get"), ("/v1/completions", "post")):
        operation = spec["paths"][path][method]
        assert operation["security"] == [{"APIKey": []}] and "401" in operation["responses"], path
    assert "security" not in spec["paths"]["/health"]["get"] and "security" not in spec["paths"]["/metrics"]["get"]


def test_keys_are_compared_in_full_against_every_key():
    keys = [k.encode() for k in KEYS]
    assert key_matches(KEYS[1].encode(), keys) and key_matches(KEYS[0].encode(), keys)
    assert not key_matches(KEYS[0][:-1].encode(), keys) and not key_matches(b"", keys)


def test_key_settings_are_checked_at_start_in_one_line_without_the_key(model_dir, tmp_path, monkeypatch):
    from service.config import load_settings

    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    cases = [({"API_KEY_FILE": str(tmp_path / "missing")},
              f"API_KEY_FILE {tmp_path / 'missing'} cannot be read: No such file or directory"),
             ({"API_KEY_FILE": str(empty)}, f"API_KEY_FILE {empty} holds no key"),
             ({"API_KEY": " , "}, "API_KEY is set but holds no key"),
             ({"API_KEY": "has space-secret"}, "an API key may hold only visible ASCII characters (no spaces)"),
             ({"API_KEY": "naïve-secret"}, "an API key may hold only visible ASCII characters (no spaces)")]
    monkeypatch.setenv("MODEL_DIR", str(model_dir))
    for env, message in cases:
        with monkeypatch.context() as m:
            for name, value in env.items():
                m.setenv(name, value)
            with pytest.raises(SystemExit) as failure:
                load_settings()
        assert str(failure.value) == f"service: invalid settings: {message}"
    settings = Settings(model_dir=model_dir, api_key="the-secret")
    assert "the-secret" not in repr(settings) and "the-secret" not in str(settings.model_dump())


def test_the_openai_client_raises_authentication_error_and_works_with_a_key(model_dir):
    engine = FakeEngine()
    app = create_keyed_app(model_dir, engine)
    with served(app, ready_timeout=10) as url:
        for key in ("wrong-key", ""):
            client = openai.OpenAI(base_url=url + "/v1", api_key=key or "unused", max_retries=0)
            if not key:  # the client always sends its key: strip it to send none
                client = client.with_options(default_headers={"Authorization": ""})
            with pytest.raises(openai.AuthenticationError) as failure:
                client.completions.create(model=model_dir.name, prompt="abc", max_tokens=3)
            assert failure.value.status_code == 401 and failure.value.code == "invalid_api_key"
            assert failure.value.type == "invalid_request_error"
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEYS[1], max_retries=0)
        assert [m.id for m in client.models.list().data] == [model_dir.name]
        r = client.completions.create(model=model_dir.name, prompt="abc", max_tokens=3)
        assert r.choices[0].text == "cba"


def create_keyed_app(model_dir, engine):
    from service.app import create_app

    return create_app(Settings(model_dir=model_dir, max_batch_size=2, api_key=",".join(KEYS)),
                      engine_factory=lambda s: engine)


# --- CORS --------------------------------------------------------------------------------------

def test_cors_is_off_by_default(model_dir):
    with TestClient(fake_app(model_dir, FakeEngine())) as client:
        wait_ready(client, timeout=5)
        r = client.get("/health", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in r.headers


def test_cors_origins_are_allowed_and_a_preflight_needs_no_key(model_dir):
    app = fake_app(model_dir, FakeEngine(), api_key=KEYS[0], cors_origins="https://app.example, https://b.example")
    with TestClient(app) as client:
        wait_ready(client, timeout=5)
        preflight = client.options("/v1/completions", headers={
            "Origin": "https://b.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://b.example"
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        r = client.post("/generate", json=BODY, headers={"Origin": "https://app.example"} | bearer(KEYS[0]))
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        # A browser reads the 401 too.
        r = client.post("/generate", json=BODY, headers={"Origin": "https://app.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
        other = client.options("/generate", headers={"Origin": "https://evil.example",
                                                     "Access-Control-Request-Method": "POST"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
