"""scripts/download_model.py, offline: local source, hub cache, idempotency, atomicity, retries.

No test reaches the network: a fixture makes every outgoing connection fail the test, the hub
path is fed from a hub cache laid out by hand (as huggingface_hub writes it), and the online
path runs against a fake repository listing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import requests
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "download_model.py"
REPO_ID = "distilbert/distilgpt2"
COMMIT = "2290a62682d06624634c1f46a6ad5be0f47f38aa"


def load_script():
    """The script is not a package module; load it from its path, as `python scripts/...` does."""
    spec = importlib.util.spec_from_file_location("download_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dm = load_script()  # also puts the repository root on sys.path, for `service` below

from service.model_files import MANIFEST, SERVICE_FILES, check_model_dir, verify_manifest  # noqa: E402

# A repository as the hub holds it: the service's files beside weights for other frameworks.
SERVICE_CONTENT = {
    "config.json": b'{"model_type": "gpt2"}',
    "tf_model.h5": b"\x89HDF\r\n" + b"w" * 2048,
    "tokenizer.json": b'{"model": {}}',
    "vocab.json": b'{"a": 0}',
    "merges.txt": b"#version: 0.2\n",
    "generation_config.json": b"{}",
    "tokenizer_config.json": b'{"eos_token": "<|im_end|>"}',
    "chat_template.jinja": b"{% for m in messages %}{{ m['content'] }}{% endfor %}",
}
OTHER_CONTENT = {
    "pytorch_model.bin": b"torch" * 100,
    "model.safetensors": b"st" * 100,
    "flax_model.msgpack": b"flax" * 100,
    "rust_model.ot": b"rust" * 100,
    "onnx/decoder_model.onnx": b"onnx" * 100,
    "onnx/config.json": b"{}",
    "64-8bits.tflite": b"tfl" * 100,
    "README.md": b"# distilgpt2\n",
    ".gitattributes": b"*.bin filter=lfs\n",
}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open an internet connection fails the test."""

    def refuse(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"test tried to connect to {address}")
        return real_connect(self, address, *args, **kwargs)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for huggingface_hub, which read its environment when it was imported."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def make_hub_cache(cache: Path, files: dict[str, bytes], revision: str = "main") -> Path:
    """Lay out `files` as huggingface_hub's cache holds a snapshot of REPO_ID at `revision`."""
    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return cache


def listing(model_dir: Path) -> set[str]:
    return {p.name for p in model_dir.iterdir()}


def run_main(model_dir: Path, **env: str) -> int:
    return dm.main([], {"MODEL_DIR": str(model_dir), **env})


# ---- local source (air-gapped) ------------------------------------------------------------


def test_local_source_copies_only_service_files(tmp_path):
    source = write_files(tmp_path / "source", {**SERVICE_CONTENT, **OTHER_CONTENT})
    model_dir = tmp_path / "volume" / "model"

    assert run_main(model_dir, MODEL_SOURCE=str(source)) == 0

    assert listing(model_dir) == set(SERVICE_CONTENT) | {MANIFEST}
    for name, data in SERVICE_CONTENT.items():
        assert (model_dir / name).read_bytes() == data
    check_model_dir(model_dir)
    verify_manifest(model_dir)
    manifest = json.loads((model_dir / MANIFEST).read_text())
    assert manifest["source"]["model_source"] == str(source)
    # Only the model directory and its lock file remain beside it: no staging left behind.
    assert listing(model_dir.parent) == {"model", ".model.lock"}


def test_local_source_missing_weights_fails_with_one_line(tmp_path, capsys):
    source = write_files(tmp_path / "source", {"config.json": b"{}", "tokenizer.json": b"{}"})
    model_dir = tmp_path / "volume" / "model"

    assert run_main(model_dir, MODEL_SOURCE=str(source)) == 1

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tf_model.h5" in err[0]
    assert not model_dir.exists()


def test_local_source_changed_is_copied_again(tmp_path):
    source = write_files(tmp_path / "source", SERVICE_CONTENT)
    model_dir = tmp_path / "volume" / "model"
    assert run_main(model_dir, MODEL_SOURCE=str(source)) == 0

    (source / "tf_model.h5").write_bytes(b"new weights, other size")
    assert run_main(model_dir, MODEL_SOURCE=str(source)) == 0

    assert (model_dir / "tf_model.h5").read_bytes() == b"new weights, other size"
    check_model_dir(model_dir)


# ---- hub path -----------------------------------------------------------------------------


def test_hub_cache_offline_takes_only_service_files(tmp_path, monkeypatch, offline):
    cache = make_hub_cache(tmp_path / "hf-cache", {**SERVICE_CONTENT, **OTHER_CONTENT})
    calls = []
    real = huggingface_hub.snapshot_download

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr("huggingface_hub.snapshot_download", spy)
    model_dir = tmp_path / "volume" / "model"

    assert run_main(model_dir, HF_HUB_CACHE=str(cache)) == 0

    assert len(calls) == 1
    assert calls[0]["repo_id"] == REPO_ID and calls[0]["revision"] == "main"
    assert sorted(calls[0]["allow_patterns"]) == sorted(SERVICE_FILES)
    assert listing(model_dir) == set(SERVICE_CONTENT) | {MANIFEST}
    for name, data in SERVICE_CONTENT.items():
        assert (model_dir / name).read_bytes() == data
    verify_manifest(model_dir)
    # A cache the user named is theirs: it is kept.
    assert (cache / ("models--" + REPO_ID.replace("/", "--")) / "snapshots" / COMMIT / "pytorch_model.bin").exists()


def test_hub_online_requests_only_service_files(tmp_path, monkeypatch):
    """With the hub reachable, snapshot_download lists the repo and fetches only SERVICE_FILES."""
    from huggingface_hub import HfApi, _snapshot_download
    from huggingface_hub.hf_api import ModelInfo

    every_file = {**SERVICE_CONTENT, **OTHER_CONTENT}

    def repo_info(self, repo_id, **kwargs):
        return ModelInfo(id=repo_id, sha=COMMIT, siblings=[{"rfilename": n} for n in every_file])

    fetched = []

    def hf_hub_download(repo_id, filename, *, revision, cache_dir, **kwargs):
        fetched.append(filename)
        path = Path(cache_dir) / "fake" / revision / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(every_file[filename])
        link = Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / revision / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
        return str(link)

    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    monkeypatch.setattr(_snapshot_download, "hf_hub_download", hf_hub_download)
    model_dir = tmp_path / "volume" / "model"

    assert run_main(model_dir) == 0

    assert sorted(fetched) == sorted(SERVICE_CONTENT)
    assert listing(model_dir) == set(SERVICE_CONTENT) | {MANIFEST}
    # The private cache inside the volume is gone once the model is in place.
    assert listing(model_dir.parent) == {"model", ".model.lock"}


def test_cli_with_hub_cache_and_offline_env(tmp_path):
    """The script as the init container runs it, with the environment variables, not patches."""
    cache = make_hub_cache(tmp_path / "hf-cache", {**SERVICE_CONTENT, **OTHER_CONTENT})
    model_dir = tmp_path / "volume" / "model"
    env = {
        **os.environ,
        "MODEL_DIR": str(model_dir),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("MODEL_SOURCE", None)

    first = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True)
    second = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True)

    assert first.returncode == 0, first.stderr
    assert listing(model_dir) == set(SERVICE_CONTENT) | {MANIFEST}
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stderr


# ---- idempotency --------------------------------------------------------------------------


def test_second_run_makes_no_network_call(tmp_path, monkeypatch, offline):
    cache = make_hub_cache(tmp_path / "hf-cache", SERVICE_CONTENT)
    model_dir = tmp_path / "volume" / "model"
    assert run_main(model_dir, HF_HUB_CACHE=str(cache)) == 0
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}

    def forbidden(**kwargs):
        raise AssertionError("snapshot_download called although the model is complete")

    monkeypatch.setattr("huggingface_hub.snapshot_download", forbidden)
    assert run_main(model_dir, HF_HUB_CACHE=str(cache)) == 0

    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before


def test_weights_not_matching_manifest_are_fetched_again(tmp_path, offline):
    cache = make_hub_cache(tmp_path / "hf-cache", SERVICE_CONTENT)
    model_dir = tmp_path / "volume" / "model"
    assert run_main(model_dir, HF_HUB_CACHE=str(cache)) == 0
    os.truncate(model_dir / "tf_model.h5", 10)

    assert run_main(model_dir, HF_HUB_CACHE=str(cache)) == 0

    assert (model_dir / "tf_model.h5").read_bytes() == SERVICE_CONTENT["tf_model.h5"]


def test_other_revision_is_fetched_again(tmp_path, monkeypatch, offline):
    cache = make_hub_cache(tmp_path / "hf-cache", SERVICE_CONTENT)
    model_dir = tmp_path / "volume" / "model"
    assert run_main(model_dir, HF_HUB_CACHE=str(cache)) == 0
    calls = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda **kw: calls.append(kw) or _raise_offline())

    assert run_main(model_dir, HF_HUB_CACHE=str(cache), MODEL_REVISION=COMMIT[:7] + "x") == 1

    assert [c["revision"] for c in calls] == [COMMIT[:7] + "x"]
    check_model_dir(model_dir)  # the previous model is untouched


def _raise_offline():
    raise LocalEntryNotFoundError("outgoing traffic has been disabled")


# ---- a partial download never looks complete ---------------------------------------------


def interrupted_download(written: dict[str, bytes]):
    """A snapshot_download that writes some files into its cache and then loses the network."""

    def fake(*, cache_dir, **kwargs):
        write_files(Path(cache_dir) / "partial", written)
        raise requests.exceptions.ConnectionError("connection reset by peer")

    return fake


def test_interrupted_first_download_leaves_no_model_dir(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.snapshot_download", interrupted_download(SERVICE_CONTENT))
    monkeypatch.setattr(dm.time, "sleep", lambda s: None)
    model_dir = tmp_path / "volume" / "model"

    assert run_main(model_dir, DOWNLOAD_RETRIES="2") == 1

    assert not model_dir.exists()
    # Nothing under the volume holds a manifest: no directory can pass for a complete model.
    assert not list((tmp_path / "volume").rglob(MANIFEST))


def test_interrupted_update_keeps_previous_model(tmp_path, monkeypatch):
    source = write_files(tmp_path / "source", SERVICE_CONTENT)
    model_dir = tmp_path / "volume" / "model"
    assert run_main(model_dir, MODEL_SOURCE=str(source)) == 0
    manifest_before = (model_dir / MANIFEST).read_text()
    monkeypatch.setattr("huggingface_hub.snapshot_download", interrupted_download({"tf_model.h5": b"half"}))
    monkeypatch.setattr(dm.time, "sleep", lambda s: None)

    assert run_main(model_dir, DOWNLOAD_RETRIES="1") == 1

    assert (model_dir / MANIFEST).read_text() == manifest_before
    verify_manifest(model_dir)


def test_crash_before_manifest_is_not_complete(tmp_path, monkeypatch):
    """Files all in staging, then the process dies before the manifest: a rerun redoes it."""
    source = write_files(tmp_path / "source", SERVICE_CONTENT)
    model_dir = tmp_path / "volume" / "model"

    def die(model_dir, extra=None):
        raise KeyboardInterrupt  # as if killed between the last file and the manifest

    with monkeypatch.context() as patch:
        patch.setattr(dm, "write_manifest", die)
        with pytest.raises(KeyboardInterrupt):
            run_main(model_dir, MODEL_SOURCE=str(source))
    assert not model_dir.exists()
    source_desc = dm.describe_source(REPO_ID, "main", str(source))
    assert not dm.is_complete(model_dir, source_desc)

    assert run_main(model_dir, MODEL_SOURCE=str(source)) == 0
    assert dm.is_complete(model_dir, source_desc)


# A source on a slow disk: the real script, whose file copies write 4 KiB every 10 ms, so a
# kill lands in the middle of one.
SLOW_SOURCE = """
import runpy, shutil, sys, time

def copyfile(src, dst, **kwargs):
    with open(src, "rb") as f, open(dst, "wb") as out:
        while chunk := f.read(4096):
            out.write(chunk)
            out.flush()
            time.sleep(0.01)
    return dst

shutil.copyfile = copyfile
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("previous", [False, True], ids=["first-download", "update"])
def test_sigkill_mid_copy_shows_nothing_partial_and_the_next_run_completes(tmp_path, previous):
    import signal
    import time

    big = {**SERVICE_CONTENT, "tf_model.h5": b"\x89HDF\r\n" + os.urandom(64 * 1024)}  # 16 writes
    source = write_files(tmp_path / "source", big)
    model_dir = tmp_path / "volume" / "model"
    if previous:
        old = write_files(tmp_path / "old-source", SERVICE_CONTENT)
        assert run_main(model_dir, MODEL_SOURCE=str(old)) == 0
        manifest_before = (model_dir / MANIFEST).read_text()
    env = dict(os.environ, MODEL_DIR=str(model_dir), MODEL_SOURCE=str(source))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SOURCE, str(SCRIPT)], env=env)
    staged = model_dir.with_name(".model.download") / "model" / "tf_model.h5"
    deadline = time.monotonic() + 30
    while not (staged.is_file() and staged.stat().st_size > 0):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert 0 < staged.stat().st_size < len(big["tf_model.h5"])  # killed mid-copy

    # What the service would look at: the previous model, whole, or nothing at all.
    if previous:
        assert (model_dir / MANIFEST).read_text() == manifest_before
        verify_manifest(model_dir)
        assert (model_dir / "tf_model.h5").read_bytes() == SERVICE_CONTENT["tf_model.h5"]
    else:
        assert not model_dir.exists()
    manifests = {p.parent for p in (tmp_path / "volume").rglob(MANIFEST)}
    assert manifests == ({model_dir} if previous else set())

    assert run_main(model_dir, MODEL_SOURCE=str(source)) == 0
    verify_manifest(model_dir)
    assert (model_dir / "tf_model.h5").read_bytes() == big["tf_model.h5"]
    assert listing(model_dir.parent) == {"model", ".model.lock"}


# ---- retries ------------------------------------------------------------------------------


def test_transient_errors_are_retried_with_backoff(tmp_path, monkeypatch):
    snapshot = write_files(tmp_path / "snapshot", SERVICE_CONTENT)
    outcomes = [requests.exceptions.ConnectionError("reset"), requests.exceptions.ReadTimeout("slow")]

    def flaky(**kwargs):
        if outcomes:
            raise outcomes.pop(0)
        return str(snapshot)

    sleeps = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", flaky)
    monkeypatch.setattr(dm.time, "sleep", sleeps.append)
    model_dir = tmp_path / "volume" / "model"

    assert run_main(model_dir) == 0

    assert sleeps == [2.0, 4.0]
    check_model_dir(model_dir)


def test_persistent_network_failure_ends_with_one_clear_line(tmp_path, monkeypatch, capsys):
    attempts = []

    def down(**kwargs):
        attempts.append(1)
        raise requests.exceptions.ConnectionError("Failed to resolve 'huggingface.co'")

    sleeps = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", down)
    monkeypatch.setattr(dm.time, "sleep", sleeps.append)
    model_dir = tmp_path / "volume" / "model"

    assert run_main(model_dir, DOWNLOAD_RETRIES="4") == 1

    assert len(attempts) == 4 and sleeps == [2.0, 4.0, 8.0]
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("download_model: error: cannot fetch distilbert/distilgpt2@main after 4 attempts")
    assert "Failed to resolve 'huggingface.co'" in last
    assert not model_dir.exists()


def test_unknown_repository_is_not_retried(tmp_path, monkeypatch, capsys):
    attempts = []

    def missing(**kwargs):
        attempts.append(1)
        raise RepositoryNotFoundError("404 Client Error: Repository Not Found for url: .../no/such-model")

    monkeypatch.setattr("huggingface_hub.snapshot_download", missing)
    monkeypatch.setattr(dm.time, "sleep", lambda s: pytest.fail("slept before a permanent error"))

    assert run_main(tmp_path / "volume" / "model", MODEL_ID="no/such-model") == 1

    assert len(attempts) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no/such-model" in err[0] and "Repository Not Found" in err[0]


def test_unreachable_hub_reported_as_cache_miss_is_transient():
    """snapshot_download raises LocalEntryNotFoundError from the network error; that is transient."""
    try:
        try:
            raise requests.exceptions.ConnectionError("unreachable")
        except requests.exceptions.ConnectionError as cause:
            raise LocalEntryNotFoundError("cannot find the snapshot folder") from cause
    except LocalEntryNotFoundError as exc:
        wrapped = exc
    assert dm.is_transient(wrapped)
    assert not dm.is_transient(LocalEntryNotFoundError("outgoing traffic has been disabled"))


def test_missing_model_dir_setting(capsys):
    assert dm.main([], {}) == 1
    assert "MODEL_DIR" in capsys.readouterr().err


def test_error_line_names_the_underlying_network_failure():
    from urllib3.exceptions import MaxRetryError

    reason = OSError("Failed to resolve 'huggingface.co'")
    wrapped = requests.exceptions.ConnectionError(MaxRetryError(None, "/api/models/x", reason))

    assert dm.one_line(wrapped) == "OSError: Failed to resolve 'huggingface.co'"
