"""Convert a model directory's weights into the LiteRT files the service serves.

    python scripts/convert_model.py --model-dir DIR [--force]

Reads GPT-2's TensorFlow weights (tf_model.h5), or a Llama-family model's safetensors
(LlamaForCausalLM: SmolLM2, TinyLlama, Llama; Qwen2ForCausalLM: Qwen2, Qwen2.5), as config.json's
`architectures` says; any other architecture fails with one line naming the supported ones.
Writes, beside the weights: `decoder.fp32.tflite` and `decoder.int8.tflite` (signatures
`extend`, `decode` and `head`; int8 = dynamic-range int8 weights), `embeddings.npy` and `positions.npy`
(looked up on the host: GPT-2's position embeddings, or a rotary model's cos and sin), and `litert.json` (what was converted, from which weights, and the int8
quality gate's figures and decision). Then it rewrites `manifest.json` with every file's size and
sha256.

- Idempotent: if `litert.json` records these very weights (sha256 of the weight files and
  config.json) and this converter's version, it exits 0 at once (`--force` converts anyway).
- Atomic: files are written to a temporary folder in DIR and moved into place, `litert.json`
  last and the manifest after it; the service treats the conversion as done only when the
  manifest lists every LiteRT file, so an interrupted run never looks complete.
- A failure exits 1 with one line on stderr.

Compose's model-init runs it after the download; run it yourself for a local model directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.model_files import (  # noqa: E402
    CONFIG,
    LITERT_FILES,
    LITERT_FORMAT,
    LITERT_META,
    weight_files,
    ModelDirError,
    check_model_dir,
    has_litert_files,
    litert_model_file,
    read_manifest,
    sha256_of,
    write_manifest,
)

# Model files of earlier formats (3 and 4 named them after GPT-2), removed once a conversion is done.
STALE_FILES = ("gpt2.fp32.tflite", "gpt2.int8.tflite")
CONVERTER_VERSION = LITERT_FORMAT  # bump it (in service/model_files.py) when the files' layout or signatures change


def source_fingerprint(model_dir: Path) -> str:
    """What the LiteRT files were made from: the weights and the configuration (a sha256 of
    their sha256 sums)."""
    sums = " ".join(sha256_of(model_dir / name) for name in (CONFIG, *weight_files(model_dir)))
    return hashlib.sha256(sums.encode()).hexdigest()


def is_converted(model_dir: Path, fingerprint: str) -> bool:
    if not has_litert_files(model_dir):
        return False
    try:
        meta = json.loads((model_dir / LITERT_META).read_text())
    except ValueError:
        return False
    return meta.get("source_sha256") == fingerprint and meta.get("converter_version") == CONVERTER_VERSION


def convert_model_dir(model_dir: Path, force: bool = False) -> dict:
    """Convert in place (see the module's docstring); returns litert.json's content."""
    check_model_dir(model_dir)
    fingerprint = source_fingerprint(model_dir)
    if not force and is_converted(model_dir, fingerprint):
        meta = json.loads((model_dir / LITERT_META).read_text())
        meta["skipped"] = True
        return meta

    import numpy as np

    from service.engine import litert_convert, quality
    from service.engine.litert_gpt2 import Decoder, Rows, load_tokenizer

    started = time.monotonic()
    _ensure_fast_tokenizer(model_dir)
    weights, shape = litert_convert.load_weights(model_dir)
    eos = json.loads((model_dir / CONFIG).read_text()).get("eos_token_id", shape.vocab_size - 1)
    eos_id = int(eos[0] if isinstance(eos, list) else eos)  # a list's first is the primary (end_of_sequence_ids)

    tmp = model_dir / ".litert-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        np.save(tmp / "embeddings.npy", weights["wte"])
        np.save(tmp / "positions.npy", litert_convert.host_positions(weights))
        for precision, flatbuffer in litert_convert.convert(weights, shape).items():  # consumes the weights
            (tmp / litert_model_file(precision)).write_bytes(flatbuffer)
        del weights

        ids = load_tokenizer(model_dir).encode(quality.TEXT.read_text(), add_special_tokens=False).ids
        tokens = quality.windows(ids, shape.n_positions)
        embeddings, positions = Rows(tmp / "embeddings.npy"), np.load(tmp / "positions.npy")
        decoders = {p: Decoder(tmp / litert_model_file(p), embeddings, positions, len(os.sched_getaffinity(0)))
                    for p in ("fp32", "int8")}
        report = quality.compare(decoders["fp32"], decoders["int8"], tokens)
        del decoders

        meta = {
            "converter_version": CONVERTER_VERSION,
            "source_sha256": fingerprint,
            "architecture": shape.architecture,
            "n_layer": shape.n_layer, "n_head": shape.n_head, "n_kv_head": shape.kv_heads,
            "head_dim": shape.dim, "n_embd": shape.n_embd,
            "vocab_size": shape.vocab_size, "n_positions": shape.n_positions, "eos_token_id": eos_id,
            "models": {p: litert_model_file(p) for p in ("fp32", "int8")},
            "embeddings": "embeddings.npy", "positions": "positions.npy",
            "quality": report.as_dict(),
            "seconds": round(time.monotonic() - started, 1),
        }
        (tmp / LITERT_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name in LITERT_FILES:  # LITERT_META is last
            (tmp / name).replace(model_dir / name)
        for name in STALE_FILES:  # an earlier format's, which nothing reads any more
            (model_dir / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest = read_manifest(model_dir) or {}
    write_manifest(model_dir, extra={k: v for k, v in manifest.items() if k != "files"})
    return meta


def _ensure_fast_tokenizer(model_dir: Path) -> None:
    """The LiteRT backend reads tokenizer.json alone; a model with only vocab.json + merges.txt
    gets one, written by transformers from the same files."""
    if (model_dir / "tokenizer.json").is_file():
        return
    if not (model_dir / "vocab.json").is_file():
        raise ModelDirError(f"{model_dir} has no tokenizer.json")
    from transformers import GPT2TokenizerFast

    GPT2TokenizerFast.from_pretrained(model_dir).backend_tokenizer.save(str(model_dir / "tokenizer.json"))


def summary(model_dir: Path, meta: dict) -> str:
    if meta.get("skipped"):
        return f"convert_model: {model_dir} already holds LiteRT files for these weights; nothing to do"
    sizes = ", ".join(f"{p} {(model_dir / f).stat().st_size / 2**20:.0f} MiB" for p, f in meta["models"].items())
    return f"convert_model: converted {model_dir} in {meta['seconds']} s ({sizes}); {meta['quality']['reason']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, type=Path, help="model directory to convert in place")
    parser.add_argument("--force", action="store_true", help="convert even if already converted")
    args = parser.parse_args(argv)
    try:
        meta = convert_model_dir(args.model_dir, force=args.force)
    except ModelDirError as exc:
        print(f"convert_model: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # one line, whatever failed (TensorFlow's errors are of many types)
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"convert_model: converting {args.model_dir} failed: {type(exc).__name__}: {message}", file=sys.stderr)
        return 1
    print(summary(args.model_dir, meta), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
