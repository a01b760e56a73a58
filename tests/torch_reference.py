"""Tiny random-weight Llama-family models and transformers' own results on them: the reference
tests/test_llama.py holds the LiteRT engine to.

Run by the PyTorch venv's python (bench/torch_env.py; torch never enters the service's venv):

    bench/.venv-torch/bin/python tests/torch_reference.py --out DIR [--scan MODEL]

It writes DIR/<name>/ for each model below, as `save_pretrained` writes it (config.json,
generation_config.json, model.safetensors or a sharded index, tokenizer.json,
tokenizer_config.json with the chat template, special_tokens_map.json), and DIR/reference.json:
for each model, greedy `generate` of every prompt alone (new ids, each step's log-softmax of
the chosen token and its top 5), every prompt position's log-probability from one forward pass,
the smallest top-1/top-2 logit gap met, chat renderings by `apply_chat_template`, and greedy chat
answers. Every reference is computed from the saved files loaded back in float32 (the bf16
variant is upcast, as the converter upcasts it).

Weights are random but wider than transformers' init (std 0.2, norms and biases random too), so
the logits are not flat and greedy choices are not near-ties; each model's seed was picked so
that its smallest top-1/top-2 gap passes MIN_GAP (`--scan MODEL` prints the gaps of other seeds).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM)

import chat_models
from chat_models import CHATML

MAX_NEW_TOKENS = 24
CHAT_MAX_TOKENS = 16
TOP = 5
MIN_GAP = 1e-3  # smallest top-1/top-2 logit gap a reference may have: below it, greedy comparisons are flaky
STD = 0.2  # weights' normal init (transformers' default 0.02 gives nearly flat logits)
PROMPT_LENGTHS = (1, 5, 30, 100, 200)

# English, code and Unicode (accents, CJK, an emoji): the tokenizers' training text and the prompts'.
CORPUS = """The quick brown fox jumps over the lazy dog. A small model learns the shape of text, one token at a time.
When the river rose in spring, the village moved its boats to the hill and waited for the water to fall.
def add(a, b):
    \"\"\"Return the sum of a and b.\"\"\"
    return a + b

for i in range(10):
    if i % 2 == 0:
        print(f"even: {i}")
    else:
        print("odd", i)

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)
Le café de la gare est fermé le dimanche; la crème brûlée y est très appréciée. Über den Wolken muß die Freiheit
wohl grenzenlos sein. El niño comió una piña en la mañana. Ça va très bien, merci!
東京は日本の首都です。日本語の文章も少し入れておきます。我们今天去公园散步。
Let's celebrate 🎉 the release with cake 🍰 and coffee ☕. Numbers like 3.14159 and 2,718 appear too.
The committee met on Tuesday to discuss the budget, the schedule and the new building on Main Street.
Everyone agreed that the library should stay open late during the exam weeks of the winter term.
"""

PROMPT_TEXTS = (
    "The",
    "def add(a, b):\n    return",
    "Le café de la gare est fermé le dimanche; la crème brûlée y est très appréciée. 日本語 🎉",
    CORPUS,
    CORPUS * 2,
)

BYTE_LEVEL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SENTENCEPIECE_SPECIALS = ("<unk>", "<s>", "</s>")
# Characters the SentencePiece-style vocabulary leaves to byte pieces, beside everything from U+0300 on
# (CJK, the emoji): two-byte ones too.
BYTES_ONLY = "ñç"
# TinyLlama-chat's (Zephyr's) template: it writes the BOS itself.
ZEPHYR = ("{{ bos_token }}{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
          "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
          "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
          "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
          "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")

CONVERSATIONS = {
    **chat_models.CONVERSATIONS,
    "turns without system": [{"role": "user", "content": "Who are you?"},
                             {"role": "assistant", "content": "A tiny model."},
                             {"role": "user", "content": "Tell me more."}],
    "unicode": [{"role": "user", "content": "日本語 🎉 café <b>&amp;</b> \"q\""}],
}

# name: (architecture, tokenizer, seed, config); variants of a model are saved from it.
MODELS = {
    "llama": ("llama", "byte-level", 14, dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "llama-sp": ("llama", "sentencepiece", 2, dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
        rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "qwen2": ("qwen2", "byte-level", 4, dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)),
}
VARIANTS = {"qwen2-bf16": "qwen2", "llama-sharded": "llama"}
CHAT_MODEL = "qwen2"  # the one the live service test chats with


# --- tokenizers ----------------------------------------------------------------------------------

def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE as SmolLM2's and Qwen2's, its special tokens added last (as Qwen2's)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_LEVEL_SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>", chat_template=CHATML, clean_up_tokenization_spaces=False)


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE as Llama 2's and TinyLlama's tokenizer.json: <unk> <s> </s>, then the
    256 byte pieces <0x00>..<0xFF>, then the pieces learnt; byte fallback for the characters left
    out of the alphabet (CJK, the emoji, BYTES_ONLY), <s> added by the post-processor."""
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    # The left-out characters are dropped from the text rather than by `limit_alphabet`, which
    # breaks ties between equally rare characters differently from run to run.
    text = "".join(c for c in CORPUS if c not in BYTES_ONLY and ord(c) < 0x300)
    learner.train_from_iterator([text], trainers.BpeTrainer(vocab_size=420, show_progress=False))
    learnt = json.loads(learner.to_str())["model"]
    vocab = {t: i for i, t in enumerate(SENTENCEPIECE_SPECIALS)}
    vocab |= {f"<0x{b:02X}>": len(SENTENCEPIECE_SPECIALS) + b for b in range(256)}
    for piece, _ in sorted(learnt["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learnt["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SENTENCEPIECE_SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>",
        chat_template=ZEPHYR, clean_up_tokenization_spaces=False)


TOKENIZERS = {"byte-level": byte_level_tokenizer, "sentencepiece": sentencepiece_tokenizer}


# --- models --------------------------------------------------------------------------------------

def build_model(name: str, tokenizer, seed: int):
    architecture, _, _, shape = MODELS[name]
    config_class, model_class = ((LlamaConfig, LlamaForCausalLM) if architecture == "llama"
                                 else (Qwen2Config, Qwen2ForCausalLM))
    config = config_class(vocab_size=len(tokenizer), max_position_embeddings=256, initializer_range=STD,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, dtype="float32", **shape)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight"):  # init 1: a converter that ignored them would pass
                param.copy_(1 + STD * torch.randn_like(param))
            elif param_name.endswith(".bias"):  # Qwen2's q/k/v biases: init 0, the same
                param.normal_(0.0, 0.5)
    ends = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=ends if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token_id)
    return model


def load(name: str, directory: Path):
    model_class = LlamaForCausalLM if MODELS[VARIANTS.get(name, name)][0] == "llama" else Qwen2ForCausalLM
    return model_class.from_pretrained(directory, dtype=torch.float32).eval()


# --- references ----------------------------------------------------------------------------------

def top_of(logprobs: torch.Tensor, k: int = TOP + 1) -> list[list]:
    values, ids = torch.topk(logprobs, k)
    return [[int(i), float(v)] for i, v in zip(ids, values)]


def generation(model, ids: list[int], max_new_tokens: int, eos: list[int] | None = None) -> dict:
    """transformers' greedy `generate` of `ids` alone: new ids, each step's chosen-token
    log-probability and top tokens (log-softmax in float64 of the raw logits), the smallest
    top-1/top-2 logit gap, and where it stopped. `eos` None: it never stops early."""
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=max_new_tokens, output_logits=True,
                                 return_dict_in_generate=True)
    finally:
        model.generation_config.eos_token_id = saved
    new = [int(t) for t in out.sequences[0, len(ids):]]
    steps = []
    for token, logits in zip(new, out.logits):
        logits = logits[0].to(torch.float64)
        if token != int(torch.argmax(logits)):
            raise AssertionError("generate's choice is not the argmax of its raw logits: a logits processor ran")
        best = torch.topk(logits, 2).values
        logprobs = torch.log_softmax(logits, -1)
        steps.append({"token": token, "logprob": float(logprobs[token]), "top": top_of(logprobs),
                      "gap": float(best[0] - best[1])})
    return {"new_ids": new, "steps": steps, "min_gap": min(step["gap"] for step in steps)}


def prompt_logprobs(model, ids: list[int]) -> list[dict | None]:
    """Each prompt position's log-probability given the tokens before it, from one forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].to(torch.float64)
    logprobs = torch.log_softmax(logits, -1)
    return [None] + [{"token": ids[i], "logprob": float(logprobs[i - 1, ids[i]]), "top": top_of(logprobs[i - 1])}
                     for i in range(1, len(ids))]


def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(text, add_special_tokens=False).input_ids[:n] for text, n in zip(PROMPT_TEXTS, PROMPT_LENGTHS)]


def model_reference(model, tokenizer, eos: list[int]) -> dict:
    """The prompts' rows, and a one-token prompt whose answer ends on an end token (the first such
    ordinary token), for the end's own log-probability."""
    rows, special = [], set(tokenizer.all_special_ids)
    ordinary = [[t] for t in range(len(tokenizer)) if t not in special]
    stops = first_that_stops(model, ordinary, MAX_NEW_TOKENS, eos, tokenizer.pad_token_id)
    for ids in prompts(tokenizer) + ([] if stops is None else [ordinary[stops]]):
        row = {"prompt_ids": ids, **generation(model, ids, MAX_NEW_TOKENS), "prompt_logprobs": prompt_logprobs(model, ids)}
        # Where a row stops on an end-of-sequence token (the engine stops there; generate above did not).
        row["stop"] = next((i for i, t in enumerate(row["new_ids"]) if t in eos), None)
        row["min_gap"] = min(step["gap"] for step in row["steps"][:None if row["stop"] is None else row["stop"] + 1])
        row["text"] = tokenizer.decode(row["new_ids"][:row["stop"]])
        rows.append(row)
    return {"eos_ids": eos, "rows": rows, "min_gap": min(r["min_gap"] for r in rows)}


def chat_renderings(tokenizer) -> list[dict]:
    out = []
    for name, messages in CONVERSATIONS.items():
        for add in (True, False):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add)
            out.append({"name": name, "messages": messages, "add_generation_prompt": add, "text": text, "ids": ids})
    return out


def chat_answers(model, tokenizer, eos: list[int]) -> list[dict]:
    """Greedy chat answers (temperature 0, CHAT_MAX_TOKENS), as the service must give them: one that
    runs to the length, and the first of a few questions whose answer ends on an end token."""
    def answer(messages):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        found = generation(model, ids, CHAT_MAX_TOKENS, eos)
        new = found["new_ids"]
        stopped = bool(new) and new[-1] in eos
        tokens = new[:-1] if stopped else new
        return {"messages": messages, "prompt_ids": ids, "completion_ids": tokens,
                "text": tokenizer.decode(tokens), "finish_reason": "stop" if stopped else "length",
                "min_gap": found["min_gap"]}

    questions = [[{"role": "user", "content": f"Question {i}: what comes next?"}] for i in range(300)]
    texts = [tokenizer.apply_chat_template(q, tokenize=False, add_generation_prompt=True) for q in questions]
    found = first_that_stops(model, [tokenizer(t, add_special_tokens=False).input_ids for t in texts],
                             CHAT_MAX_TOKENS, eos, tokenizer.pad_token_id)
    return [answer(CONVERSATIONS["several turns"])] + ([] if found is None else [answer(questions[found])])


def first_that_stops(model, candidates: list[list[int]], max_new_tokens: int, eos: list[int], pad: int) -> int | None:
    """The first of `candidates` (prompt ids) whose greedy answer alone ends on an end token after
    at least two tokens, found by one batched `generate` (left-padded) and checked alone."""
    width = max(map(len, candidates))
    ids = torch.tensor([[pad] * (width - len(c)) + c for c in candidates])
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in candidates])
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        with torch.no_grad():
            new = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens)[:, width:]
    finally:
        model.generation_config.eos_token_id = saved
    for i, row in enumerate(new.tolist()):
        if any(t in eos for t in row[2:]) and not any(t in eos for t in row[:2]):
            alone = generation(model, candidates[i], max_new_tokens, eos)
            if alone["new_ids"][-1] in eos and len(alone["new_ids"]) > 2 and alone["min_gap"] >= MIN_GAP:
                return i
    return None


def byte_fallback_cases(tokenizer) -> list[dict]:
    """Fixed id sequences whose text goes through byte pieces: multi-byte characters the vocabulary
    lacks, and a stray continuation byte (U+FFFD in the text itself)."""
    cases = []
    for text in ("日本 🎉 café", "☕ ok"):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        cases.append({"ids": ids, "text": tokenizer.decode(ids)})
    stray = [tokenizer.convert_tokens_to_ids("<0x80>")] + tokenizer("fox", add_special_tokens=False).input_ids
    cases.append({"ids": stray, "text": tokenizer.decode(stray)})
    return cases


def build(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    reference = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                 "max_new_tokens": MAX_NEW_TOKENS, "models": {}}
    tokenizers = {kind: make() for kind, make in TOKENIZERS.items()}
    for name, (architecture, kind, seed, _) in MODELS.items():
        tokenizer = tokenizers[kind]
        model = build_model(name, tokenizer, seed)
        saved = {name: (model, {})}
        if name == "qwen2":
            saved["qwen2-bf16"] = (copy.deepcopy(model).to(torch.bfloat16), {})
        if name == "llama":
            saved["llama-sharded"] = (model, {"max_shard_size": "100KB"})
        for saved_name, (weights, options) in saved.items():
            directory = out / saved_name
            weights.save_pretrained(directory, safe_serialization=True, **options)
            tokenizer.save_pretrained(directory, save_jinja_files=False)
            loaded = load(saved_name, directory)
            eos = loaded.generation_config.eos_token_id
            eos = eos if isinstance(eos, list) else [eos]
            entry = {"architecture": type(loaded).__name__, "tokenizer": kind, "seed": seed,
                     "dtype": str(next(weights.parameters()).dtype).removeprefix("torch."),
                     "files": sorted(p.name for p in directory.iterdir()),
                     **model_reference(loaded, tokenizer, eos),
                     "chats": chat_renderings(tokenizer),
                     # tokenizer(text): with the special tokens the tokenizer adds itself
                     "encodings": [{"text": t, "ids": tokenizer(t).input_ids} for t in PROMPT_TEXTS[:3]]}
            if saved_name == CHAT_MODEL:
                entry["chat_answers"] = chat_answers(loaded, tokenizer, eos)
            if kind == "sentencepiece":
                entry["byte_fallback"] = byte_fallback_cases(tokenizer)
            entry["min_gap"] = min([entry["min_gap"]] + [a["min_gap"] for a in entry.get("chat_answers", ())])
            if entry["min_gap"] < MIN_GAP:
                raise SystemExit(f"torch_reference: {saved_name}'s smallest top-1/top-2 gap is {entry['min_gap']:.2e} "
                                 f"< {MIN_GAP}: pick another seed (--scan {name})")
            reference["models"][saved_name] = entry
    (out / "reference.json").write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n")
    return reference


def scan(name: str, seeds: range) -> None:
    """Print each seed's smallest top-1/top-2 gap over the reference steps (in memory, float32)."""
    tokenizer = TOKENIZERS[MODELS[name][1]]()
    for seed in seeds:
        model = build_model(name, tokenizer, seed)
        gaps = [generation(model, ids, MAX_NEW_TOKENS)["min_gap"] for ids in prompts(tokenizer)]
        print(f"{name} seed {seed}: smallest gap {min(gaps):.2e}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory to write the models and reference.json into")
    parser.add_argument("--scan", choices=sorted(MODELS), help="print the gaps of seeds 0-19 for this model")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the same sums in the same order, whatever the machine
    if args.scan:
        scan(args.scan, range(20))
        return 0
    if args.out is None:
        parser.error("--out is required")
    reference = build(args.out)
    for name, entry in reference["models"].items():
        print(f"{name}: {entry['architecture']} ({entry['dtype']}), smallest gap {entry['min_gap']:.2e}, "
              f"files {', '.join(entry['files'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
