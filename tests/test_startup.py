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
                                       "tf_model.h5 (or model.safetensors, or model.safetensors.index.json and its shards), tokenizer.json (or vocab.json + merges.txt)")


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


def test_a_weight_file_corrupted_after_download_stops_the_server_with_one_line(tmp_path, litert_model_dir):
    """Same size, other bytes (the sizes check passes; the sha256 does not): both ways of
    running the server refuse to start, with one line and a nonzero status."""
    for f in litert_model_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    weights = tmp_path / "decoder.fp32.tflite"
    with weights.open("r+b") as f:
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    for args in (("-m", "service"), ("-m", "uvicorn", "service.main:app")):
        r = run_service({"MODEL_DIR": str(tmp_path), "PORT": str(free_port()), "LITERT_PRECISION": "fp32"}, args)
        assert r.returncode == 1
        assert r.stderr.strip() == (
            f"service: refusing to start: model directory {tmp_path}: decoder.fp32.tflite does not match its sha256 in "
            "manifest.json; fetch the model again (scripts/download_model.py --force; docs/operations.md: Faults)")


def flip_a_byte(path):
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_the_sums_checked_are_those_of_the_files_the_backend_reads(tmp_path, litert_model_dir):
    """LiteRT reads one precision's .tflite file and not the source weights; TensorFlow reads no
    LiteRT file: a start checks the sums of what it reads (DistilGPT2's directory is 856 MB,
    its int8 server reads about 240 MB of it)."""
    from service.model_files import LITERT_FILES, ModelDirError, unread_files, verify_manifest

    for f in litert_model_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    flip_a_byte(tmp_path / "tf_model.h5")
    flip_a_byte(tmp_path / "decoder.int8.tflite")
    assert unread_files(tmp_path, "litert", "fp32") == {"tf_model.h5", "decoder.int8.tflite"}
    assert unread_files(tmp_path, "tf", "auto") == set(LITERT_FILES)
    verify_manifest(tmp_path, skip=unread_files(tmp_path, "litert", "fp32"))
    for backend, precision in (("litert", "int8"), ("tf", "auto")):
        with pytest.raises(ModelDirError, match="does not match its sha256"):
            verify_manifest(tmp_path, skip=unread_files(tmp_path, backend, precision))
    with pytest.raises(ModelDirError):
        verify_manifest(tmp_path)  # every file, when nothing is skipped


def llama_model_dir(root):
    """A Llama-architecture model directory as scripts/download_model.py leaves one: safetensors
    weights, no tf_model.h5 (nothing here reads the weights' bytes)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (root / "model.safetensors").write_bytes(b"safetensors")
    (root / "tokenizer.json").write_text("{}")
    return root


def test_backend_tf_refuses_a_model_that_is_not_gpt2(tmp_path):
    model = llama_model_dir(tmp_path / "llama")
    for args in (("-m", "service"), ("-m", "uvicorn", "service.main:app")):
        r = run_service({"MODEL_DIR": str(model), "BACKEND": "tf"}, args)
        assert r.returncode == 1
        assert last_line(r.stderr) == (
            "service: invalid settings: BACKEND=tf serves the GPT-2 family only; MODEL_DIR holds a 'llama' model "
            "(LlamaForCausalLM): use BACKEND=litert (or auto)")


def test_backend_auto_serves_a_model_that_is_not_gpt2_with_litert(tmp_path, litert_model_dir):
    from service.config import Settings
    from service.model_files import LITERT_FILES

    model = llama_model_dir(tmp_path / "llama")
    r = run_service({"MODEL_DIR": str(model), "BACKEND": "auto"})
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"service: invalid settings: BACKEND=auto serves a 'llama' model (LlamaForCausalLM) with litert (tf serves "
        f"the GPT-2 family only), but {model} holds no finished LiteRT conversion; run: python "
        f"scripts/convert_model.py --model-dir {model}")

    for name in LITERT_FILES:  # a finished conversion (its content is not looked at by Settings)
        shutil.copy(litert_model_dir / name, model / name)
    assert Settings(model_dir=model).serving_backend == "litert"
    assert Settings(model_dir=model, backend="litert").serving_backend == "litert"


def test_engine_tf_refuses_a_model_that_is_not_gpt2_before_loading_it(tmp_path):
    from service.engine.tf_gpt2 import TFGPT2Engine

    model = llama_model_dir(tmp_path / "llama")
    with pytest.raises(ValueError) as caught:
        TFGPT2Engine(model)
    assert str(caught.value) == ("the TensorFlow GPT-2 engine serves the GPT-2 family only; the model is a 'llama' "
                                 "model (LlamaForCausalLM)")


def test_an_unreadable_config_json_is_named(tmp_path):
    model = llama_model_dir(tmp_path / "llama")
    (model / "config.json").write_text("{")
    r = run_service({"MODEL_DIR": str(model)})
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"service: invalid settings: model directory {model}: unreadable config.json (Expecting property name "
        "enclosed in double quotes: line 1 column 2 (char 1))")


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
    # Drained, then shut down: exit status 0 (service/shutdown.py).
    assert proc.returncode == 0, output
    assert "Application shutdown complete" in output
    # One access line per request, the service's own (uvicorn's is dropped); health checks stay out.
    access = [line for line in output.splitlines() if " INFO service.access [" in line]
    assert len(access) == 1 and re.search(r"\[[0-9a-f]{32}\]: POST /generate 200 [0-9.]+ ms", access[0]), output
    assert "GET /health" not in output
    if backend == "litert":  # the API logs the conversion's int8 decision at start
        assert "int8 quality gate at conversion: int8 rejected: top-1 agreement" in output


def start_service(model_dir, **env_overrides):
    """`python -m service` on `model_dir` (LiteRT), one prompt at a time so a request of several
    prompts takes a while; returns the process and its URL once /health answers 200."""
    import httpx

    port = free_port()
    # MAX_TOTAL_TOKENS: the tests' long requests (32 prompts x 1000 tokens) ask for more than the default.
    env = dict(os.environ, MODEL_DIR=str(model_dir), PORT=str(port), HOST="127.0.0.1", MAX_BATCH_SIZE="1",
               LOG_LEVEL="INFO", MAX_TOTAL_TOKENS="100000") | env_overrides
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)


def post_in_background(url, body):
    """POST `body` from a thread; returns the thread and a list that receives the response."""
    import threading

    import httpx

    answer = []
    thread = threading.Thread(target=lambda: answer.append(httpx.post(url, json=body, timeout=60)))
    thread.start()
    return thread, answer


# Eight prompts of 1000 tokens, one at a time: about 2 s of decoding on the tiny model.
LONG = {"prompts": ["Hello", "a", "b", "c", "d", "e", "f", "g"], "max_tokens": 1000, "temperature": 0}


def test_sigterm_drains_accepted_work_refuses_new_work_and_exits_0(litert_model_dir):
    import httpx

    proc, url = start_service(litert_model_dir)
    try:
        long, answer = post_in_background(url + "/generate", LONG)
        time.sleep(0.3)  # it is decoding
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        new = httpx.post(url + "/generate", json={"prompts": ["x"], "max_tokens": 5})
        assert (new.status_code, new.headers["retry-after"], new.json()) == (
            503, "5", {"detail": "the server is shutting down; retry later"})
        v1 = httpx.post(url + "/v1/completions", json={"model": litert_model_dir.name, "prompt": "x", "max_tokens": 5})
        assert (v1.status_code, v1.headers["retry-after"], v1.json()) == (503, "5", {"error": {
            "message": "the server is shutting down; retry later", "type": "service_unavailable", "param": None,
            "code": None}})
        health = httpx.get(url + "/health")
        assert (health.status_code, health.json()) == (
            503, {"status": "draining", "backend": "litert", "precision": "fp32"})
        long.join(30)
        assert answer[0].status_code == 200 and len(answer[0].json()["results"]) == 8
        output = proc.communicate(timeout=30)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert re.search(r"draining: 1 running and [1-7] queued prompts may take up to 30 s", output)
    assert re.search(r"service\.runtime( \[[^]]*\])?: drained", output) and "Application shutdown complete" in output


def test_a_second_sigterm_answers_the_rest_503_and_exits_at_once(litert_model_dir):
    proc, url = start_service(litert_model_dir)
    try:
        long, answer = post_in_background(url + "/generate", LONG | {"prompts": ["p"] * 32})  # about 8 s
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        second = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
        took = time.monotonic() - second
        long.join(5)
    finally:
        proc.kill()
    assert proc.returncode == 0 and took < 3, output
    assert (answer[0].status_code, answer[0].headers["retry-after"], answer[0].json()) == (
        503, "5", {"detail": "the server shut down before this request finished; retry later"})


def test_at_the_end_of_the_grace_period_the_rest_gets_503(litert_model_dir):
    proc, url = start_service(litert_model_dir, SHUTDOWN_GRACE_SECONDS="0.5")
    try:
        long, answer = post_in_background(url + "/generate", LONG | {"prompts": ["p"] * 32})
        time.sleep(0.3)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
        took = time.monotonic() - signalled
        long.join(5)
    finally:
        proc.kill()
    assert proc.returncode == 0 and 0.5 <= took < 3.5, output
    assert answer[0].status_code == 503
    assert "shutdown grace of 0.5 s over: 1 running and" in output
