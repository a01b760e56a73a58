"""What a model directory must hold, and the manifest that proves a download is complete.

Shared by the service (which checks a directory before it loads it) and by
`scripts/download_model.py` (which writes the manifest last, so a partial download never
looks complete).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "manifest.json"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
WEIGHTS = "tf_model.h5"  # GPT-2's TensorFlow weights (the tf backend and GPT-2's conversion read them)
# Other architectures' weights (weight_files): one safetensors file, or the shards an index names.
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# A GPT-2 tokenizer is either the fast tokenizer's single file or the slow one's pair.
TOKENIZER_CHOICES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
# LiteRT files, made from the TensorFlow weights by scripts/convert_model.py (litert.json last).
LITERT_META = "litert.json"
# The LiteRT files' layout and signatures, recorded in litert.json as `converter_version`; the
# service reads only this one (scripts/convert_model.py converts again when it differs).
LITERT_FORMAT = 7
LITERT_FILES = ("decoder.fp32.tflite", "decoder.int8.tflite", "embeddings.npy", "positions.npy", LITERT_META)
# The files downloads fetch when the repository has them (`missing_files` says which are required);
# the converter adds LITERT_FILES.
SERVICE_FILES = (
    CONFIG,
    WEIGHTS,
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    GENERATION_CONFIG,
    # Optional, like the four before it: the chat template of a chat model
    # (service/chat_template.py; it may instead be inside tokenizer_config.json).
    "chat_template.jinja",
)


def end_of_sequence_ids(model_dir: Path, primary: int | None = None) -> tuple[int, frozenset[int]]:
    """The end-of-sequence tokens a row stops on, as transformers' `generate` reads them:
    `eos_token_id` (an id or a list: Qwen2's chat models end a turn with <|im_end|> and text
    with <|endoftext|>) from generation_config.json when it names one, else config.json's.

    Returns the primary id (`primary` if given, else config.json's, else the first listed) and
    the set, which always holds the primary."""
    def listed(name: str) -> list[int]:
        path = model_dir / name
        value = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
        if value is None:
            return []
        return [int(v) for v in value] if isinstance(value, list) else [int(value)]

    config = listed(CONFIG)
    ids = listed(GENERATION_CONFIG) or config
    if primary is None and not (config or ids):
        raise ModelDirError(f"{model_dir} names no eos_token_id in {GENERATION_CONFIG} or {CONFIG}")
    if primary is None:
        primary = (config or ids)[0]
    return primary, frozenset(ids) | {primary}


class ModelDirError(ValueError):
    """The model directory is missing, incomplete or does not match its manifest."""


def model_type(model_dir: Path) -> tuple[str, tuple[str, ...]]:
    """config.json's `model_type` ("gpt2" where it names none, as transformers' GPT2Config reads
    it) and `architectures`: what decides which backend can serve the model."""
    try:
        config = json.loads((model_dir / CONFIG).read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"model directory {model_dir}: unreadable {CONFIG} ({exc})") from exc
    architectures = config.get("architectures")
    architectures = architectures if isinstance(architectures, list) else [architectures] if architectures else []
    return str(config.get("model_type") or "gpt2"), tuple(str(a) for a in architectures)


def describe_model(kind: str, architectures: tuple[str, ...] | list[str] = ()) -> str:
    """A model as errors name it: "a 'llama' model (LlamaForCausalLM)"."""
    return f"a {kind!r} model" + (f" ({', '.join(architectures)})" if architectures else "")


def weight_files(model_dir: Path) -> list[str]:
    """The weights' file names: tf_model.h5 where there is one, else model.safetensors, else
    the shards model.safetensors.index.json names (sorted); empty if none is there."""
    if (model_dir / WEIGHTS).is_file():
        return [WEIGHTS]
    if (model_dir / SAFETENSORS).is_file():
        return [SAFETENSORS]
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelDirError(f"model directory {model_dir}: unreadable {SAFETENSORS_INDEX} ({exc})") from exc
        return [SAFETENSORS_INDEX, *shards]
    return []


def missing_files(model_dir: Path) -> list[str]:
    """Names of the files the service needs that `model_dir` lacks (empty when complete)."""
    missing = [CONFIG] if not (model_dir / CONFIG).is_file() else []
    weights = weight_files(model_dir)
    if not weights:
        missing.append(f"{WEIGHTS} (or {SAFETENSORS}, or {SAFETENSORS_INDEX} and its shards)")
    missing += [name for name in weights if not (model_dir / name).is_file()]
    if not any(all((model_dir / n).is_file() for n in choice) for choice in TOKENIZER_CHOICES):
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    return missing


def check_model_dir(model_dir: Path) -> None:
    """Raise ModelDirError naming the path and what is wrong; cheap (no hashing)."""
    if not model_dir.is_dir():
        raise ModelDirError(f"model directory {model_dir} does not exist")
    missing = missing_files(model_dir)
    if missing:
        raise ModelDirError(f"model directory {model_dir} is missing {', '.join(missing)}")
    manifest = read_manifest(model_dir)
    if manifest is not None:
        for name, entry in manifest["files"].items():
            path = model_dir / name
            if not path.is_file() or path.stat().st_size != entry["size"]:
                raise ModelDirError(
                    f"model directory {model_dir}: {name} does not match {MANIFEST} "
                    f"(expected {entry['size']} bytes)"
                )


def litert_model_file(precision: str) -> str:
    return f"decoder.{precision}.tflite"


def resolve_precision(precision: str, meta: dict) -> str:
    """LITERT_PRECISION with auto resolved by the conversion's int8 quality gate (litert.json)."""
    if precision == "auto":
        return "int8" if meta["quality"]["int8_enabled"] else "fp32"
    return precision


def unread_files(model_dir: Path, backend: str, precision: str) -> set[str]:
    """The files of a model directory a backend never reads: LiteRT reads one precision's
    .tflite file and none of the source weights, TensorFlow no LiteRT file. Nothing when the
    conversion's litert.json cannot be read (the check then reads every file)."""
    if backend == "tf":
        return set(LITERT_FILES)
    try:
        served = resolve_precision(precision, json.loads((model_dir / LITERT_META).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {*weight_files(model_dir), *(litert_model_file(p) for p in ("fp32", "int8") if p != served)}


def has_litert_files(model_dir: Path) -> bool:
    """Whether a conversion finished here: every LiteRT file is present and, where there is a
    manifest, listed in it (the converter rewrites the manifest last)."""
    if not all((model_dir / name).is_file() for name in LITERT_FILES):
        return False
    manifest = read_manifest(model_dir)
    return manifest is None or all(name in manifest["files"] for name in LITERT_FILES)


def litert_format(model_dir: Path) -> int | None:
    """The `converter_version` a finished conversion here recorded (None if unreadable)."""
    try:
        return int(json.loads((model_dir / LITERT_META).read_text())["converter_version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(model_dir: Path) -> dict | None:
    path = model_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
            isinstance(e, dict) and {"size", "sha256"} <= e.keys() for e in files.values()
        ):
            raise ValueError("bad 'files' entry")
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelDirError(f"model directory {model_dir}: unreadable {MANIFEST} ({exc})") from exc
    return manifest


def verify_manifest(model_dir: Path, skip: Iterable[str] = ()) -> None:
    """Check every file's sha256 against the manifest, if there is one (reads every byte), but
    the files in `skip` (those the serving backend never reads: `unread_files`). The files are
    hashed side by side, a thread per core (hashlib lets go of the GIL): the model file and the
    embeddings are most of a start's sums."""
    manifest = read_manifest(model_dir)
    if manifest is None:
        return
    # Largest first, so that the threads finish together.
    names = sorted((name for name in manifest["files"] if name not in skip), key=lambda n: -manifest["files"][n]["size"])
    with ThreadPoolExecutor(max_workers=max(1, min(len(names), len(os.sched_getaffinity(0))))) as pool:
        digests = dict(zip(names, pool.map(lambda name: sha256_of(model_dir / name), names)))
    for name in names:
        if digests[name] != manifest["files"][name]["sha256"]:
            raise ModelDirError(f"model directory {model_dir}: {name} does not match its sha256 in {MANIFEST}")


def write_manifest(model_dir: Path, extra: dict | None = None) -> dict:
    """Record name, size and sha256 of every service file present; written last by downloads and
    by the converter."""
    files = {
        name: {"size": (model_dir / name).stat().st_size, "sha256": sha256_of(model_dir / name)}
        for name in dict.fromkeys((*SERVICE_FILES, *weight_files(model_dir), *LITERT_FILES))
        if (model_dir / name).is_file()
    }
    manifest = {**(extra or {}), "files": files}
    tmp = model_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(model_dir / MANIFEST)
    return manifest
