"""Request ids, the access line, LOG_FORMAT and the HTTP metrics."""

import json
import logging
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest
from fastapi.testclient import TestClient

from conftest import ENGINE_OPTIONS
from fakes import FakeEngine
from service.observability import JsonFormatter, RequestIdFilter, sanitised_request_id
from test_api import fake_app, metric, wait_ready
from test_startup import ROOT, free_port


@pytest.fixture
def client(model_dir):
    with TestClient(fake_app(model_dir, FakeEngine(), api_key="the-key", max_queue_size=8)) as client:
        wait_ready(client, timeout=5)
        yield client


AUTH = {"Authorization": "Bearer the-key"}


def test_a_request_id_is_made_or_taken_and_echoed(client):
    made = client.get("/health").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert client.get("/health").headers["x-request-id"] != made
    r = client.post("/generate", json={"prompts": "ab", "max_tokens": 2}, headers={"X-Request-ID": "abc-123"} | AUTH)
    assert r.headers["x-request-id"] == "abc-123"
    # Errors answered before routing carry it too.
    assert client.post("/generate", json={}, headers={"X-Request-ID": "no-key"}).headers["x-request-id"] == "no-key"


def test_a_client_s_request_id_is_sanitised_and_bounded():
    assert sanitised_request_id("trace:1/2+3=4@x_y.z-w") == "trace:1/2+3=4@x_y.z-w"
    assert sanitised_request_id('a b"c\\d\te<f>\x7f') == "abcdef"
    assert sanitised_request_id("x" * 500) == "x" * 128
    assert re.fullmatch(r"[0-9a-f]{32}", sanitised_request_id(" \"\t"))
    assert re.fullmatch(r"[0-9a-f]{32}", sanitised_request_id(None))


def test_one_access_line_per_request_with_its_id_and_timings_and_none_for_health(client, caplog):
    caplog.set_level(logging.INFO, logger="service.access")
    client.get("/health")
    client.post("/generate", json={"prompts": ["abc", "de"], "max_tokens": 5}, headers={"X-Request-ID": "r-1"} | AUTH)
    client.post("/generate", json={"prompts": "abc"}, headers={"X-Request-ID": "r-2"})
    lines = [r for r in caplog.records if r.name == "service.access"]
    assert [(r.access["path"], r.access["status"]) for r in lines] == [("/generate", 200), ("/generate", 401)]
    first, second = lines[0].access, lines[1].access
    assert first["method"] == "POST" and first["duration_ms"] > 0
    assert 0 <= first["queue_wait_ms"] <= first["duration_ms"] and 0 < first["ttft_ms"] <= first["duration_ms"]
    assert "queue_wait_ms" not in second and "ttft_ms" not in second
    assert first["client"].startswith("testclient:")
    assert lines[0].getMessage().startswith("POST /generate 200 ")


def test_log_records_made_during_a_request_carry_its_id(client, caplog):
    caplog.set_level(logging.INFO)
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    handler = Keep()
    handler.addFilter(RequestIdFilter())
    logging.getLogger().addHandler(handler)
    try:
        client.post("/generate", json={"prompts": "ab", "max_tokens": 2}, headers={"X-Request-ID": "id-7"} | AUTH)
    finally:
        logging.getLogger().removeHandler(handler)
    access = [r for r in seen if r.name == "service.access"]
    assert [r.request_id for r in access] == ["id-7"]
    outside = logging.LogRecord("x", logging.INFO, __file__, 1, "outside", None, None)
    RequestIdFilter().filter(outside)
    assert outside.request_id == "-"


def test_the_json_formatter_writes_one_object_per_line():
    record = logging.LogRecord("service.access", logging.INFO, __file__, 1, "POST %s", ("/generate\nx",), None)
    record.request_id = "r-9"
    record.access = {"method": "POST", "status": 200}
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry | {"time": None} == {"time": None, "level": "INFO", "logger": "service.access",
                                      "message": "POST /generate\nx", "request_id": "r-9", "method": "POST",
                                      "status": 200}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["time"])
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    failed.request_id = "-"
    entry = json.loads(JsonFormatter().format(failed))
    assert "request_id" not in entry and "ValueError: boom" in entry["exc_info"]


def test_http_metrics_count_requests_by_route_and_status_and_tokens_in_and_out(client):
    client.post("/generate", json={"prompts": ["abc", "de"], "max_tokens": 5}, headers=AUTH)
    client.post("/generate", json={"prompts": "abc"})
    client.post("/generate", json={"prompts": 5}, headers=AUTH)
    client.get("/v1/nowhere", headers=AUTH)
    text = client.get("/metrics").text
    assert 'llm_http_requests_total{method="POST",route="/generate",status="200"} 1.0' in text
    assert 'llm_http_requests_total{method="POST",route="/generate",status="401"} 1.0' in text
    assert 'llm_http_requests_total{method="POST",route="/generate",status="422"} 1.0' in text
    assert 'llm_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert 'llm_http_request_duration_seconds_count{method="POST",route="/generate"} 3.0' in text
    assert metric(client, "llm_prompt_tokens_total") == 5
    assert metric(client, "llm_generated_tokens_total") == 5
    for name in ("llm_warmup_seconds", "llm_batch_rows_count", "llm_time_to_first_token_seconds_count"):
        metric(client, name)  # there
    assert 'llm_backend_info{backend="fake",precision="fp32"} 1.0' in text


def test_python_m_service_logs_json_lines_with_an_access_line_per_request(litert_model_dir):
    """LOG_FORMAT=json: every line the server writes, uvicorn's included, is one JSON object."""
    port = free_port()
    env = dict(os.environ, MODEL_DIR=str(litert_model_dir), PORT=str(port), LOG_FORMAT="json", LOG_LEVEL="info",
               MAX_BATCH_SIZE=str(ENGINE_OPTIONS["max_batch_size"]))
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/generate", method="POST",
                                         data=json.dumps({"prompts": ["Hello"], "max_tokens": 3}).encode(),
                                         headers={"content-type": "application/json", "X-Request-ID": "json-1"})
        with urllib.request.urlopen(request, timeout=60) as r:
            assert r.status == 200 and r.headers["X-Request-ID"] == "json-1"
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    # TensorFlow Lite's C++ runtime writes to stderr itself, past Python's logging.
    entries = [json.loads(line) for line in output.splitlines() if not line.startswith(("INFO: ", "WARNING: All"))]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any(e["logger"] == "uvicorn.error" and "Application startup complete" in e["message"] for e in entries)
    access = [e for e in entries if e["logger"] == "service.access"]
    assert len(access) == 1, access  # /health stays out
    line = access[0]
    assert (line["method"], line["path"], line["status"], line["request_id"]) == ("POST", "/generate", 200, "json-1")
    assert line["duration_ms"] >= line["ttft_ms"] > 0 and line["queue_wait_ms"] >= 0


class BrokenEncoder(FakeEngine):
    def encode(self, text, special_tokens=True):
        raise RuntimeError("a bug")


def test_an_unexpected_error_is_a_500_that_still_carries_the_request_id(model_dir, caplog):
    caplog.set_level(logging.INFO)
    app = fake_app(model_dir, BrokenEncoder(), max_queue_size=8)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client, timeout=5)
        r = client.post("/generate", json={"prompts": "ab"}, headers={"X-Request-ID": "bug-1"})
        assert (r.status_code, r.json()) == (500, {"detail": "internal error: RuntimeError"})
        assert r.headers["x-request-id"] == "bug-1"
        model = client.get("/v1/models").json()["data"][0]["id"]
        r = client.post("/v1/completions", json={"model": model, "prompt": "ab"}, headers={"X-Request-ID": "bug-2"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert r.headers["x-request-id"] == "bug-2"
        assert 'llm_http_requests_total{method="POST",route="/generate",status="500"} 1.0' in client.get("/metrics").text
    access = [r.access for r in caplog.records if r.name == "service.access" and r.access["status"] == 500]
    assert [a["path"] for a in access] == ["/generate", "/v1/completions"]
    assert any(r.levelname == "ERROR" and r.exc_info for r in caplog.records)
