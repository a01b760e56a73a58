"""A Hugging Face model directory to GGUF, with llama.cpp's own converter (convert_hf_to_gguf.py).

Run in the PyTorch venv (the converter imports torch and transformers):

    python -m bench.gguf_convert LLAMA_CPP_DIR MODEL_DIR OUTFILE {f32,q8_0}

One change to the converter, made here and not in its file: it names a BPE tokenizer's
pre-tokenizer by hashing how the tokenizer splits a fixed text, and refuses a tokenizer it has
never seen (https://github.com/ggml-org/llama.cpp/pull/6920). The bench's random-weight models
carry tokenizers trained for them (scripts/make_test_model.py, bench/make_model.py), so no hash
is known; their pre-tokenizer is plain byte-level BPE with GPT-2's split pattern, which is
llama.cpp's "gpt-2". That name is given only to such a tokenizer, and only when the hash is
unknown; every other tokenizer is still refused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def is_gpt2_byte_level(tokenizer_json: Path) -> bool:
    """Whether tokenizer.json splits as GPT-2 does: a ByteLevel pre-tokenizer with its regex and
    no prefix space, and no normalizer."""
    try:
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    pre = spec.get("pre_tokenizer") or {}
    return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) and not pre.get("add_prefix_space", False))


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    src, model_dir, outfile, outtype = Path(argv[0]), Path(argv[1]), Path(argv[2]), argv[3]
    sys.path[:0] = [str(src / "gguf-py"), str(src)]
    import convert_hf_to_gguf
    from conversion.base import TextModel

    known = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            if is_gpt2_byte_level(Path(self.dir_model) / "tokenizer.json"):
                print("bench.gguf_convert: unknown tokenizer hash; its pre-tokenizer is GPT-2's byte-level "
                      "split, so tokenizer.ggml.pre = 'gpt-2'", file=sys.stderr)
                return "gpt-2"
            raise

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    convert_hf_to_gguf.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
