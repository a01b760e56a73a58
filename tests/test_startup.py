"""The server as users run it: `python -m service` and `uvicorn service.main:app` in a process."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ENGINE_OPTIONS

ROOT = Path(__file__).resolve().parents[1]


def run_service(env_overrides, args=("-m", "service"), timeout=60):
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_DIR",)} | env_overrides
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def last_line(text):
    return text.strip().splitlines()[-1]


def test_missing_model_dir_setting_exits_with_one_line():
    r = run_service({})
    assert r.returncode == 1
    assert r.stderr.strip() == "service: invalid settings: MODEL_DIR is required (set it in the environment)"


def test_a_model_dir_that_does_not_exist_is_named(tmp_path):
    r = run_service({"MODEL_DIR": str(tmp_path / "nope")})
    assert r.returncode == 1
    assert r.stderr.strip() == f"service: invalid settings: model directory {tmp_path / 'nope'} does not exist"


def test_an_incomplete_model_dir_names_the_missing_files(tmp_path, model_dir):
    shutil.copy(model_dir / "config.json", tmp_path)
    for args in (("-m", "service"), ("-m", "uvicorn", "service.main:app")):
        r = run_service({"MODEL_DIR": str(tmp_path)}, args)
        assert r.returncode == 1
        assert last_line(r.stderr) == (f"service: invalid settings: model directory {tmp_path} is missing "
                                       "tf_model.h5, tokenizer.json (or vocab.json + merges.txt)")


def test_a_file_that_does_not_match_the_manifest_is_refused(tmp_path, model_dir):
    from service.model_files import write_manifest

    for f in model_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    write_manifest(tmp_path)
    with open(tmp_path / "tf_model.h5", "ab") as f:
        f.write(b"x")
    r = run_service({"MODEL_DIR": str(tmp_path)})
    assert r.returncode == 1
    assert "tf_model.h5 does not match manifest.json" in r.stderr


def test_a_file_whose_bytes_do_not_match_the_manifest_stops_the_server(tmp_path, model_dir):
    from service.model_files import write_manifest

    for f in model_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    write_manifest(tmp_path)
    data = bytearray((tmp_path / "config.json").read_bytes())
    data[-2] = ord(" ") if data[-2] != ord(" ") else ord("\t")  # same size, other bytes
    (tmp_path / "config.json").write_bytes(bytes(data))
    r = run_service({"MODEL_DIR": str(tmp_path), "PORT": str(free_port())})
    assert r.returncode != 0
    assert f"model directory {tmp_path}: config.json does not match its sha256 in manifest.json" in r.stderr
    assert "Application startup failed" in r.stderr


def test_bad_numbers_in_the_environment_are_named(model_dir):
    r = run_service({"MODEL_DIR": str(model_dir), "MAX_BATCH_SIZE": "0", "PORT": "http"})
    assert r.returncode == 1
    assert "MAX_BATCH_SIZE Input should be greater than or equal to 1" in r.stderr
    assert "PORT Input should be a valid integer" in r.stderr


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("backend", ["tf", "litert"])
def test_python_m_service_serves_and_stops_cleanly(backend, request, xla_cache, tf_engine, reference):
    """BACKEND=auto picks LiteRT where the model directory holds its files; serving with LiteRT
    never loads TensorFlow."""
    model_dir = request.getfixturevalue({"tf": "model_dir", "litert": "litert_model_dir"}[backend])
    port = free_port()
    env = dict(os.environ, MODEL_DIR=str(model_dir), PORT=str(port), HOST="127.0.0.1",
               MAX_BATCH_SIZE=str(ENGINE_OPTIONS["max_batch_size"]), MIN_CACHE_SIZE=str(ENGINE_OPTIONS["smallest_cache"]),
               XLA_CACHE_DIR=str(xla_cache), LOG_LEVEL="INFO")
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        seen = set()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                status, body = http("GET", f"http://127.0.0.1:{port}/health")
                seen.add((status, body["status"]))
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        assert (200, "ok") in seen
        assert seen <= {(503, "loading"), (200, "ok")}
        assert http("GET", f"http://127.0.0.1:{port}/health") == (
            200, {"status": "ok", "backend": backend, "precision": "fp32"})
        status, body = http("POST", f"http://127.0.0.1:{port}/generate",
                            {"prompts": ["Hello", "x"], "max_tokens": 9, "temperature": 0})
        assert (status, body) == (200, {"results": [tf_engine.decode(reference(p, 9)) for p in ("Hello", "x")]})
        tensorflow_loaded = "/site-packages/tensorflow/" in Path(f"/proc/{proc.pid}/maps").read_text()
        assert tensorflow_loaded == (backend == "tf")
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    # uvicorn shuts down gracefully, then re-raises the signal (exit by SIGTERM, as supervisors expect).
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    # One access line per request, the service's own (uvicorn's is dropped); health checks stay out.
    access = [line for line in output.splitlines() if " INFO service.access [" in line]
    assert len(access) == 1 and re.search(r"\[[0-9a-f]{32}\]: POST /generate 200 [0-9.]+ ms", access[0]), output
    assert "GET /health" not in output
    if backend == "litert":  # the API logs the conversion's int8 decision at start
        assert "int8 quality gate at conversion: int8 rejected: top-1 agreement" in output
