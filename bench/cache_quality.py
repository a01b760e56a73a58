"""What the float16 key/value cache alone costs in quality, measured as the int8 gate measures.

    python -m bench.cache_quality --model-dir DIR [--text FILE ...]

The int8 file holds int8 weights and a float16 cache, and the conversion's gate judges the two
together. This converts the model's weights twice at fp32, once with each cache precision
(`litert_convert.FILES`' cache column), and reads each text through both by teacher forcing, as
`service/engine/quality.py` does: top-1 agreement and the perplexity rise against the float32
cache, on the gate's own text and on texts the gate never saw (default: the Python licence in
the running interpreter's standard library). It prints one JSON line per text.

Random weights say little of a real model's quality; the figures bound the cache's rounding on
the model at hand.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import tempfile
from pathlib import Path

FILES = {"fp32": ("fp32", "float32"), "fp32-f16": ("fp32", "float16")}


def default_texts() -> list[Path]:
    from service.engine import quality

    return [quality.TEXT, Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"]


def measure(model_dir: Path, texts: list[Path], threads: int = 2) -> list[dict]:
    import numpy as np

    from service.engine import litert_convert, quality
    from service.engine.litert_gpt2 import Decoder, Rows, load_tokenizer

    meta = json.loads((model_dir / "litert.json").read_text())
    weights, shape = litert_convert.load_weights(model_dir)
    tokenizer = load_tokenizer(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        for name, flatbuffer in litert_convert.convert(weights, shape, FILES).items():
            (Path(tmp) / f"{name}.tflite").write_bytes(flatbuffer)
        embeddings = Rows(model_dir / meta["embeddings"])
        positions = np.load(model_dir / meta["positions"], mmap_mode="r")
        decoders = {name: Decoder(Path(tmp) / f"{name}.tflite", embeddings, positions, threads) for name in FILES}
        results = []
        for text in texts:
            ids = tokenizer.encode(text.read_text(), add_special_tokens=False).ids
            tokens = quality.windows(ids, shape.n_positions)
            report = quality.compare(decoders["fp32"], decoders["fp32-f16"], tokens)
            results.append({"text": str(text), "tokens": report.tokens, "agreement": round(report.agreement, 4),
                            "perplexity_float32_cache": round(report.perplexity_fp32, 4),
                            "perplexity_float16_cache": round(report.perplexity_int8, 4),
                            "perplexity_rise": report.perplexity_rise,
                            "within_gate": report.int8_enabled})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="a model directory converted for LiteRT")
    parser.add_argument("--text", type=Path, action="append", help="a text to read (repeatable)")
    args = parser.parse_args(argv)
    for result in measure(args.model_dir, args.text or default_texts()):
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
