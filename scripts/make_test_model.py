"""Write a random-weight GPT-2 and a byte-level BPE tokenizer to a model directory.

No weights can be downloaded where the tests and benchmarks run, so they use a model made
here instead, saved with `save_pretrained` and loaded through the service's own loading code.

    python scripts/make_test_model.py --out DIR [--shape tiny|distilgpt2] [--seed N]

`tiny` is small enough for the unit tests (2 layers, 512 tokens, GPT-2's 1024-token context).
`distilgpt2` has DistilGPT2's exact configuration, so it costs what DistilGPT2 costs: use it for
benchmarks and local trials. The tokenizer is trained on the Python standard library's source,
which every machine with the interpreter has, so the same command writes the same files anywhere.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EOS = "<|endoftext|>"

# DistilGPT2's config.json on the hub, less the fields that only matter for training.
SHAPES = {
    # Wide initial weights make the tiny model's greedy output varied, so tests that compare
    # token sequences can tell a broken attention from a working one.
    "tiny": dict(vocab_size=512, n_positions=1024, n_embd=64, n_layer=2, n_head=4, initializer_range=0.3),
    "distilgpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=6, n_head=12),
}


def corpus_files(limit_bytes: int | None) -> list[str]:
    """The standard library's .py files in a fixed order (a reproducible local corpus)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts)
    chosen, total = [], 0
    for f in files:
        if limit_bytes is not None and total >= limit_bytes:
            break
        chosen.append(str(f))
        total += f.stat().st_size
    return chosen


def train_tokenizer(vocab_size: int):
    """A GPT-2-style byte-level BPE whose last id is <|endoftext|>, as in GPT-2 (50256)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    # Small vocabularies need little text; 50k merges need the whole library.
    files = corpus_files(2_000_000 if vocab_size < 5000 else None)
    texts = (Path(f).read_text(encoding="utf-8", errors="replace") for f in files)
    bpe.train_from_iterator(texts, vocab_size=vocab_size - 1, min_frequency=2, show_progress=False)
    if bpe.get_vocab_size() != vocab_size - 1:
        raise SystemExit(f"tokenizer training reached {bpe.get_vocab_size()} tokens, need {vocab_size - 1}")
    # padding_side must be given to the constructor: set afterwards it is not saved, and
    # batched generation goes wrong after a reload.
    tok = GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )
    tok.add_special_tokens({"eos_token": EOS})
    if tok.convert_tokens_to_ids(EOS) != vocab_size - 1:
        raise SystemExit(f"{EOS} got id {tok.convert_tokens_to_ids(EOS)}, expected {vocab_size - 1}")
    return tok


def make_model(shape: str, seed: int):
    import tensorflow as tf
    from transformers import GPT2Config, TFGPT2LMHeadModel

    dims = SHAPES[shape]
    eos_id = dims["vocab_size"] - 1
    config = GPT2Config(**dims, bos_token_id=eos_id, eos_token_id=eos_id)
    tf.keras.utils.set_random_seed(seed)
    model = TFGPT2LMHeadModel(config)
    model(tf.constant([[0]]))  # build the weights
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="model directory to write")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args(argv)

    tokenizer = train_tokenizer(SHAPES[args.shape]["vocab_size"])
    model = make_model(args.shape, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote a random-weight {args.shape} GPT-2 to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
