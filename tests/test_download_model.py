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
import types
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

# A Llama-architecture repository (SmolLM2, Qwen2, TinyLlama): no tf_model.h5; safetensors weights,
# one file or shards named by an index, beside PyTorch, ONNX and GGUF ones the service never reads.
LLAMA_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
LLAMA_SERVICE_CONTENT = {
    "config.json": b'{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}',
    "generation_config.json": b'{"eos_token_id": 2}',
    "tokenizer.json": b'{"model": {"type": "BPE"}}',
    "tokenizer_config.json": b'{"eos_token": "<|im_end|>"}',
    "special_tokens_map.json": b'{"eos_token": "<|im_end|>"}',
    "chat_template.jinja": b"{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}",
}
LLAMA_OTHER_CONTENT = {
    "pytorch_model.bin": b"torch" * 100,
    "flax_model.msgpack": b"flax" * 100,
    "onnx/model.onnx": b"onnx" * 100,
    "smollm2-135m-instruct-q8_0.gguf": b"GGUF" * 100,
    "README.md": b"# SmolLM2\n",
    ".gitattributes": b"*.safetensors filter=lfs\n",
}
SAFETENSORS_WEIGHTS = {"model.safetensors": b"safetensors" * 100}
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
SHARDED_WEIGHTS = {
    "model.safetensors.index.json": json.dumps({
        "metadata": {"total_size": 3 * 512},
        "weight_map": {
            "model.embed_tokens.weight": SHARDS[0],
            "model.layers.0.self_attn.q_proj.weight": SHARDS[0],
            "model.layers.0.mlp.down_proj.weight": SHARDS[1],
            "model.norm.weight": SHARDS[2],
            "lm_head.weight": SHARDS[2],
        },
    }).encode(),
    **{name: bytes([65 + i]) * 512 for i, name in enumerate(SHARDS)},
}
# What a sharded repository also holds in PyTorch's format.
SHARDED_OTHER_CONTENT = {
    "pytorch_model.bin.index.json": b'{"weight_map": {}}',
    "pytorch_model-00001-of-00002.bin": b"torch" * 100,
    "pytorch_model-00002-of-00002.bin": b"torch" * 100,
}
NO_WEIGHTS_LINE = (
    "has no supported weights: looked for tf_model.h5, model.safetensors, and model.safetensors.index.json "
    "with its shards (PyTorch .bin, Flax, ONNX and GGUF weights are not used)"
)


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


def make_hub_cache(cache: Path, files: dict[str, bytes], revision: str = "main", repo_id: str = REPO_ID) -> Path:
    """Lay out `files` as huggingface_hub's cache holds a snapshot of `repo_id` at `revision`."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
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


@pytest.fixture
def fake_hub(monkeypatch):
    """The hub as snapshot_download sees it: a repository holding `hub.files` at COMMIT, which
    records each listing's revision (`hub.listed`) and each file downloaded (`hub.fetched`)."""
    from huggingface_hub import HfApi, _snapshot_download
    from huggingface_hub.hf_api import ModelInfo

    hub = types.SimpleNamespace(files={}, listed=[], fetched=[])

    def repo_info(self, repo_id, *, revision=None, **kwargs):
        hub.listed.append(revision)
        return ModelInfo(id=repo_id, sha=COMMIT, siblings=[{"rfilename": n} for n in hub.files])

    def hf_hub_download(repo_id, filename, *, revision, cache_dir, **kwargs):
        hub.fetched.append(filename)
        path = Path(cache_dir) / "fake" / revision / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(hub.files[filename])
        link = Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / revision / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
        return str(link)

    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    monkeypatch.setattr(_snapshot_download, "hf_hub_download", hf_hub_download)
    # huggingface_hub's progress bars share stderr with the script's lines (as HF_HUB_DISABLE_PROGRESS_BARS=1).
    monkeypatch.setattr(sys.modules["huggingface_hub.utils.tqdm"], "HF_HUB_DISABLE_PROGRESS_BARS", True)
    return hub


def listing(model_dir: Path) -> set[str]:
    return {p.name for p in model_dir.iterdir()}


def manifest_files(model_dir: Path) -> set[str]:
    return set(json.loads((model_dir / MANIFEST).read_text())["files"])


def stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


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


@pytest.mark.parametrize("weights", [SAFETENSORS_WEIGHTS, SHARDED_WEIGHTS], ids=["single", "sharded"])
def test_local_source_safetensors(tmp_path, weights, capsys):
    source = write_files(tmp_path / "source", {**LLAMA_SERVICE_CONTENT, **weights, **LLAMA_OTHER_CONTENT,
                                               **SHARDED_OTHER_CONTENT})
    model_dir = tmp_path / "volume" / "model"

    assert run_main(model_dir, MODEL_SOURCE=str(source)) == 0

    assert listing(model_dir) == set(LLAMA_SERVICE_CONTENT) | set(weights) | {MANIFEST}
    assert manifest_files(model_dir) == set(LLAMA_SERVICE_CONTENT) | set(weights)
    verify_manifest(model_dir)
    assert stderr_lines(capsys) == [
        "download_model: installed config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json, "
        f"generation_config.json, chat_template.jinja, {', '.join(weights)} from {source} into {model_dir}"
    ]

    # Same source: done at once. A shard that changed (or the one file): copied again.
    assert run_main(model_dir, MODEL_SOURCE=str(source)) == 0
    assert stderr_lines(capsys) == [f"download_model: {model_dir} is complete ({MANIFEST} matches); nothing to do"]
    changed = list(weights)[-1]
    (source / changed).write_bytes(b"other bytes")
    assert run_main(model_dir, MODEL_SOURCE=str(source)) == 0
    assert (model_dir / changed).read_bytes() == b"other bytes"
    verify_manifest(model_dir)


def test_local_source_prefers_tf_weights_then_the_single_safetensors(tmp_path):
    source = write_files(tmp_path / "source", {**SERVICE_CONTENT, **SAFETENSORS_WEIGHTS, **SHARDED_WEIGHTS})
    model_dir = tmp_path / "volume" / "model"
    assert run_main(model_dir, MODEL_SOURCE=str(source)) == 0
    assert manifest_files(model_dir) == set(SERVICE_CONTENT)

    (source / "tf_model.h5").unlink()
    assert run_main(model_dir, MODEL_SOURCE=str(source)) == 0
    assert manifest_files(model_dir) == set(SERVICE_CONTENT) - {"tf_model.h5"} | {"model.safetensors"}
    assert listing(model_dir) == manifest_files(model_dir) | {MANIFEST}


def test_local_source_with_only_pytorch_weights_fails_with_one_line(tmp_path, capsys):
    source = write_files(tmp_path / "source", {**LLAMA_SERVICE_CONTENT, **LLAMA_OTHER_CONTENT})
    model_dir = tmp_path / "volume" / "model"

    assert run_main(model_dir, MODEL_SOURCE=str(source)) == 1

    assert stderr_lines(capsys) == [f"download_model: error: MODEL_SOURCE {source} {NO_WEIGHTS_LINE}"]
    assert not model_dir.exists()


def test_local_source_index_naming_a_missing_shard_fails_with_one_line(tmp_path, capsys):
    weights = {name: data for name, data in SHARDED_WEIGHTS.items() if name != SHARDS[1]}
    source = write_files(tmp_path / "source", {**LLAMA_SERVICE_CONTENT, **weights})
    model_dir = tmp_path / "volume" / "model"

    assert run_main(model_dir, MODEL_SOURCE=str(source)) == 1

    assert stderr_lines(capsys) == [f"download_model: error: {source} lacks {SHARDS[1]}"]
    assert not model_dir.exists()


def test_an_unreadable_index_fails_with_one_line(tmp_path, capsys):
    source = write_files(tmp_path / "source", {**LLAMA_SERVICE_CONTENT, "model.safetensors.index.json": b"{"})
    model_dir = tmp_path / "volume" / "model"

    assert run_main(model_dir, MODEL_SOURCE=str(source)) == 1

    assert stderr_lines(capsys) == [
        f"download_model: error: MODEL_SOURCE {source}: unreadable model.safetensors.index.json "
        "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"
    ]


def test_an_index_naming_a_shard_outside_its_folder_is_refused(tmp_path, capsys):
    index = json.dumps({"weight_map": {"lm_head.weight": "../outside.safetensors"}}).encode()
    source = write_files(tmp_path / "source", {**LLAMA_SERVICE_CONTENT, "model.safetensors.index.json": index})
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    model_dir = tmp_path / "volume" / "model"

    assert run_main(model_dir, MODEL_SOURCE=str(source)) == 1

    assert stderr_lines(capsys) == [
        f"download_model: error: MODEL_SOURCE {source}: model.safetensors.index.json names shards outside its "
        "folder: ../outside.safetensors"
    ]
    assert not model_dir.exists()


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


def test_hub_online_requests_only_service_files(tmp_path, fake_hub):
    """With the hub reachable, snapshot_download lists the repo and fetches only SERVICE_FILES:
    tf_model.h5 where the repository has it, never also its safetensors, in one listing."""
    fake_hub.files = {**SERVICE_CONTENT, **OTHER_CONTENT}
    model_dir = tmp_path / "volume" / "model"

    assert run_main(model_dir) == 0

    assert sorted(fake_hub.fetched) == sorted(SERVICE_CONTENT)
    assert fake_hub.listed == ["main"]
    assert listing(model_dir) == set(SERVICE_CONTENT) | {MANIFEST}
    # The private cache inside the volume is gone once the model is in place.
    assert listing(model_dir.parent) == {"model", ".model.lock"}


def test_hub_tf_weights_win_over_single_and_sharded_safetensors(tmp_path, fake_hub, capsys):
    fake_hub.files = {**SERVICE_CONTENT, **OTHER_CONTENT, **SHARDED_WEIGHTS, **SHARDED_OTHER_CONTENT}
    model_dir = tmp_path / "volume" / "model"

    assert run_main(model_dir) == 0

    assert sorted(fake_hub.fetched) == sorted(SERVICE_CONTENT)
    assert manifest_files(model_dir) == set(SERVICE_CONTENT)
    assert stderr_lines(capsys) == [
        "download_model: installed config.json, tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, "
        f"generation_config.json, chat_template.jinja, tf_model.h5 from {REPO_ID}@main into {model_dir}"
    ]


def test_hub_safetensors_only_repository(tmp_path, fake_hub, capsys):
    """No tf_model.h5: model.safetensors, asked for at the commit the first listing resolved."""
    fake_hub.files = {**LLAMA_SERVICE_CONTENT, **SAFETENSORS_WEIGHTS, **LLAMA_OTHER_CONTENT}
    model_dir = tmp_path / "volume" / "model"

    assert run_main(model_dir, MODEL_ID=LLAMA_ID) == 0

    assert sorted(fake_hub.fetched) == sorted([*LLAMA_SERVICE_CONTENT, "model.safetensors"])
    assert fake_hub.listed == ["main", COMMIT]
    assert listing(model_dir) == set(LLAMA_SERVICE_CONTENT) | {"model.safetensors", MANIFEST}
    assert manifest_files(model_dir) == set(LLAMA_SERVICE_CONTENT) | {"model.safetensors"}
    for name, data in {**LLAMA_SERVICE_CONTENT, **SAFETENSORS_WEIGHTS}.items():
        assert (model_dir / name).read_bytes() == data
    verify_manifest(model_dir)
    assert stderr_lines(capsys) == [
        "download_model: installed config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json, "
        f"generation_config.json, chat_template.jinja, model.safetensors from {LLAMA_ID}@main into {model_dir}"
    ]
    assert listing(model_dir.parent) == {"model", ".model.lock"}


def test_hub_sharded_repository_fetches_every_shard(tmp_path, fake_hub, capsys):
    fake_hub.files = {**LLAMA_SERVICE_CONTENT, **SHARDED_WEIGHTS, **SHARDED_OTHER_CONTENT, **LLAMA_OTHER_CONTENT}
    model_dir = tmp_path / "volume" / "model"

    assert run_main(model_dir, MODEL_ID=LLAMA_ID, MODEL_REVISION="v1.0") == 0

    assert sorted(fake_hub.fetched) == sorted([*LLAMA_SERVICE_CONTENT, *SHARDED_WEIGHTS])
    assert fake_hub.listed == ["v1.0", COMMIT, COMMIT]
    assert listing(model_dir) == set(LLAMA_SERVICE_CONTENT) | set(SHARDED_WEIGHTS) | {MANIFEST}
    assert manifest_files(model_dir) == set(LLAMA_SERVICE_CONTENT) | set(SHARDED_WEIGHTS)
    for name, data in SHARDED_WEIGHTS.items():
        assert (model_dir / name).read_bytes() == data
    check_model_dir(model_dir)
    verify_manifest(model_dir)
    assert stderr_lines(capsys) == [
        "download_model: installed config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json, "
        "generation_config.json, chat_template.jinja, model.safetensors.index.json, "
        f"{', '.join(SHARDS)} from {LLAMA_ID}@v1.0 into {model_dir}"
    ]


def test_hub_single_file_wins_over_the_index(tmp_path, fake_hub):
    fake_hub.files = {**LLAMA_SERVICE_CONTENT, **SAFETENSORS_WEIGHTS, **SHARDED_WEIGHTS}
    model_dir = tmp_path / "volume" / "model"

    assert run_main(model_dir, MODEL_ID=LLAMA_ID) == 0

    assert not set(SHARDS) & set(fake_hub.fetched)
    assert manifest_files(model_dir) == set(LLAMA_SERVICE_CONTENT) | {"model.safetensors"}


def test_hub_repository_with_only_pytorch_weights_fails_with_one_line(tmp_path, fake_hub, capsys):
    fake_hub.files = {**LLAMA_SERVICE_CONTENT, **LLAMA_OTHER_CONTENT, **SHARDED_OTHER_CONTENT}
    model_dir = tmp_path / "volume" / "model"

    assert run_main(model_dir, MODEL_ID=LLAMA_ID) == 1

    assert stderr_lines(capsys) == [f"download_model: error: {LLAMA_ID}@main {NO_WEIGHTS_LINE}"]
    assert sorted(fake_hub.fetched) == sorted(LLAMA_SERVICE_CONTENT)  # no weights of another format
    assert not model_dir.exists()


def test_hub_safetensors_second_run_makes_no_network_call(tmp_path, fake_hub, monkeypatch, capsys):
    fake_hub.files = {**LLAMA_SERVICE_CONTENT, **SHARDED_WEIGHTS}
    model_dir = tmp_path / "volume" / "model"
    assert run_main(model_dir, MODEL_ID=LLAMA_ID) == 0
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    capsys.readouterr()

    def forbidden(**kwargs):
        raise AssertionError("snapshot_download called although the model is complete")

    monkeypatch.setattr("huggingface_hub.snapshot_download", forbidden)
    assert run_main(model_dir, MODEL_ID=LLAMA_ID) == 0

    assert stderr_lines(capsys) == [f"download_model: {model_dir} is complete ({MANIFEST} matches); nothing to do"]
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before


def test_hub_cache_offline_sharded(tmp_path, offline):
    """Offline, every call answers with the cached snapshot; the shards are taken from it."""
    every_file = {**LLAMA_SERVICE_CONTENT, **SHARDED_WEIGHTS, **SHARDED_OTHER_CONTENT, **LLAMA_OTHER_CONTENT}
    cache = make_hub_cache(tmp_path / "hf-cache", every_file, repo_id=LLAMA_ID)
    model_dir = tmp_path / "volume" / "model"

    assert run_main(model_dir, MODEL_ID=LLAMA_ID, HF_HUB_CACHE=str(cache)) == 0

    assert listing(model_dir) == set(LLAMA_SERVICE_CONTENT) | set(SHARDED_WEIGHTS) | {MANIFEST}
    verify_manifest(model_dir)


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
