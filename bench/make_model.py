"""Write a random-weight Llama-family model laid out as its hub repository is, for the benchmark.

    bench/.venv-torch/bin/python -m bench.make_model --shape smollm2-135m --out DIR [--seed N]

No weights can be downloaded where the benchmark runs, so it measures a model of a real one's
shape instead: `config.json` with the real model's values, `model.safetensors` in bfloat16 as
the real repositories hold it (tied embeddings: no `lm_head.weight`), `generation_config.json`,
and a byte-level BPE `tokenizer.json` of exactly the configured vocabulary size with the real
special tokens at their real ids, plus `tokenizer_config.json` with a ChatML chat template.

It runs in the PyTorch baseline's venv (transformers builds the model from its config, seeded).
Initialisation leaves biases at zero and RMSNorm weights at one, which would hide a converter
that drops them, so both are drawn at random too. The tokenizer is trained on the Python
standard library's source (as scripts/make_test_model.py does); that text supports about 78k
tokens, so a larger vocabulary is filled with `<unused_N>` entries that no merge produces (the
random model still generates them; they decode to their own text).

It also writes `bench-reference/`: a reference prompt's ids and the logits of the model as saved
(its bfloat16 weights read back as float32), which the PyTorch baseline checks its loading
against before it times anything (bench/baseline.py).

Only the standard library is imported at module level: bench/cli.py, in the service's venv,
reads SHAPES.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path

from bench.baseline import REFERENCE_DIR, REFERENCE_FILE, REFERENCE_IDS_FILE, REFERENCE_PROMPT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# SmolLM2-135M-Instruct's chat template: a default system message when the first is not one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2.5-Instruct's chat template without its tool-calling branches.
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QWEN25_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)

# Per shape: the real config.json, generation_config.json, the special tokens by id (and which of
# them are not "special" to the tokenizer: Qwen's tool and fill-in-the-middle tokens), and what
# tokenizer_config.json says.
SHAPES = {
    # HuggingFaceTB/SmolLM2-135M-Instruct. (The base model says bos = eos = 0, <|endoftext|>;
    # the instruct model starts with <|im_start|> and stops at <|im_end|>.)
    "smollm2-135m": {
        "config": {
            "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
            "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": True,
            "max_position_embeddings": 8192, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 9,
            "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16", "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 49152,
        },
        "generation_config": {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
                              "transformers_version": "4.42.3"},
        "specials": dict(enumerate((
            "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>", "<filename>",
            "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
            "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>"))),
        "not_special": (),
        "tokenizer_config": {
            "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "clean_up_tokenization_spaces": False,
            "model_max_length": 8192, "chat_template": SMOLLM2_CHAT_TEMPLATE,
        },
    },
    # Qwen/Qwen2.5-0.5B-Instruct: q/k/v projections with biases; 151,643 regular tokens, then the
    # special ones, the embedding padded to 151,936 rows (filled here, so the tokenizer has them all).
    "qwen2.5-0.5b": {
        "config": {
            "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
            "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
            "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
            "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
            "use_sliding_window": False, "vocab_size": 151936,
        },
        "generation_config": {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                              "eos_token_id": [151645, 151643], "repetition_penalty": 1.1, "temperature": 0.7,
                              "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0"},
        "specials": {151643 + i: t for i, t in enumerate(QWEN25_SPECIALS)},
        "not_special": ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                        "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"),
        "tokenizer_config": {
            "tokenizer_class": "Qwen2Tokenizer", "add_prefix_space": False, "bos_token": None,
            "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace",
            "split_special_tokens": False, "additional_special_tokens": [
                t for t in QWEN25_SPECIALS[1:14]], "clean_up_tokenization_spaces": False,
            "model_max_length": 131072, "chat_template": QWEN25_CHAT_TEMPLATE,
        },
    },
}

# At least twice in the corpus, as scripts/make_test_model.py trains.
MIN_FREQUENCY = 2


def corpus_texts(limit_bytes: int | None = None):
    """The standard library's .py files in a fixed order (a reproducible local corpus), the
    first `limit_bytes` of them if given."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for f in sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts):
        if limit_bytes is not None and total >= limit_bytes:
            return
        text = f.read_text(encoding="utf-8", errors="replace")
        total += len(text)
        yield text


def build_tokenizer(vocab_size: int, specials: dict[int, str], not_special: tuple[str, ...] = (),
                    corpus_bytes: int | None = None):
    """A byte-level BPE `tokenizers.Tokenizer` of exactly `vocab_size` ids, `specials` at their
    ids, and the number of ids its training filled (the rest are `<unused_N>`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), min_frequency=MIN_FREQUENCY,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    trained.train_from_iterator(corpus_texts(corpus_bytes), trainer)
    model = json.loads(trained.to_str())["model"]
    regular = sorted(model["vocab"], key=model["vocab"].get)
    # Unreachable: the byte-level pre-tokenizer splits "<", "unused", "_", digits and ">" apart.
    regular += [f"<unused_{k}>" for k in range(vocab_size - len(specials) - len(regular))]
    fill = iter(regular)
    vocab = {(specials[i] if i in specials else next(fill)): i for i in range(vocab_size)}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=t not in not_special, normalized=False)
                            for _, t in sorted(specials.items())])
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size(with_added_tokens=True)} ids, need {vocab_size}")
    for i, t in specials.items():
        if tok.token_to_id(t) != i:
            raise SystemExit(f"{t} got id {tok.token_to_id(t)}, expected {i}")
    return tok, len(model["vocab"])


def write_tokenizer(shape: dict, out: Path) -> dict:
    from transformers import PreTrainedTokenizerFast

    tok, trained = build_tokenizer(shape["config"]["vocab_size"], shape["specials"], shape["not_special"])
    settings = {k: v for k, v in shape["tokenizer_config"].items() if k != "tokenizer_class"}
    PreTrainedTokenizerFast(tokenizer_object=tok, **settings).save_pretrained(out)
    # The real class name, so AutoTokenizer makes what it makes of the real repository; the chat
    # template inside tokenizer_config.json, where these repositories keep it (transformers
    # 4.57 saves it to chat_template.jinja instead).
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = shape["tokenizer_config"]["tokenizer_class"]
    config["chat_template"] = shape["tokenizer_config"]["chat_template"]
    (out / "chat_template.jinja").unlink(missing_ok=True)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return {"trained_tokens": trained, "filled_tokens": shape["config"]["vocab_size"] - len(shape["specials"]) - trained}


def make_model(shape: dict, seed: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = {k: v for k, v in shape["config"].items() if k not in ("architectures", "torch_dtype", "transformers_version")}
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, config.initializer_range)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def write_reference(model, out: Path) -> dict:
    """The reference prompt's ids and the logits of the model as saved (bf16 read back as fp32)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(out)(REFERENCE_PROMPT)["input_ids"]
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
    ref = out / REFERENCE_DIR
    ref.mkdir(exist_ok=True)
    np.save(ref / REFERENCE_FILE, logits)
    (ref / REFERENCE_IDS_FILE).write_text(json.dumps(ids))
    return {"positions": len(ids)}


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="model directory to write")
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    args.out.mkdir(parents=True, exist_ok=True)

    tokens = write_tokenizer(shape, args.out)
    model = make_model(shape, args.seed)
    # bfloat16 on disk, as the real repositories; the reference is that model read back as fp32.
    # Only the weights are rounded: casting the whole model would round RoPE's inverse
    # frequencies too, a buffer a loaded model computes afresh in fp32.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    write_reference(model, args.out)
    params = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    for name, content in (("config.json", shape["config"]), ("generation_config.json", shape["generation_config"])):
        (args.out / name).write_text(json.dumps(content, indent=2) + "\n")
    print(f"wrote a random-weight {args.shape} ({params / 1e6:.1f}M parameters, bfloat16; tokenizer: "
          f"{tokens['trained_tokens']} trained tokens, {tokens['filled_tokens']} filled) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
