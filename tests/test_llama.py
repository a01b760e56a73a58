"""Llama-family models on LiteRT against transformers' PyTorch models, token for token: tiny
random-weight Llama (tied embeddings, grouped-query attention), Llama with a SentencePiece
byte-fallback tokenizer and llama3 RoPE scaling (untied, one key/value head), Qwen2 (q/k/v biases),
Qwen2 saved in bf16 and Llama saved in shards (tests/torch_reference.py builds them and
transformers' results; the `llama_models` fixture runs it once a session).

Each model is converted by scripts/convert_model.py and served by the LiteRT engine: greedy tokens
exactly, log-probabilities within 1e-4; int8 runs; chat prompts render and encode as transformers
renders and tokenizes them; streamed text is the decoded text; the live service answers chats
through the official `openai` client as transformers answers them; an architecture the converter
does not know is refused in one line."""

from __future__ import annotations

import json
import shutil

import openai
import pytest

import convert_model
from conftest import served_engine
from llama_models import MODELS
from service.chat_template import load_chat_template
from service.detokenize import REPLACEMENT, IncrementalDetokenizer, byte_fallback_ids
from service.engine import GenerationRow

TOP = 5
LOGPROB_TOLERANCE = 1e-4
# Ranks of the top 5 whose reference log-probabilities are within this of a neighbour's may swap.
TIE = 2 * LOGPROB_TOLERANCE
CHAT_MODEL = "qwen2"


@pytest.fixture(scope="module")
def engines(llama_models):
    """`get(name, precision)`: the model converted (once) and its LiteRT engine (once each,
    fp32 warmed up as the service warms it). A failure is kept and raised again for every test
    that asks, rather than converting again."""
    from service.engine.litert_gpt2 import LiteRTGPT2Engine

    made: dict = {}

    def once(key, make):
        if key not in made:
            try:
                made[key] = make()
            except Exception as exc:
                made[key] = exc
        if isinstance(made[key], Exception):
            raise made[key]
        return made[key]

    def get(name: str, precision: str = "fp32"):
        model_dir = llama_models.dir(name)
        once(("converted", name), lambda: convert_model.convert_model_dir(model_dir))

        def make():
            engine = LiteRTGPT2Engine(model_dir, precision=precision, max_batch_size=8)
            if precision == "fp32":
                engine.warmup()
            return engine

        return once((name, precision), make)

    return get


def run_together(engine, rows: list[GenerationRow]) -> list[dict]:
    """All rows in one batch to their ends: each row's tokens, log-probability entries and finish."""
    assert len(rows) <= engine.max_batch_size
    out = [{"tokens": [], "logprobs": [], "finish": None} for _ in rows]
    batch = engine.new_batch()
    batch.extend(list(enumerate(rows)))
    while len(batch):
        for update in batch.advance():
            assert update.error is None, update.error
            row = out[update.key]
            row["tokens"] += update.tokens
            row["logprobs"] += update.logprobs or []
            row["finish"] = update.finish or row["finish"]
    return out


def expected_of(row: dict) -> tuple[list[int], list[dict]]:
    """A reference row as the engine gives it: the tokens before the first end token, and one
    log-probability entry per token, the end token's included."""
    stop = row["stop"]
    return row["new_ids"][:stop], row["steps"] if stop is None else row["steps"][:stop + 1]


def entry_differences(where: str, got, want: dict) -> list[str]:
    """How an engine's TokenLogprob differs from a reference entry (token, logprob, top 6): the
    chosen token's log-probability, the top 5's log-probabilities rank by rank, and their tokens
    except at ranks whose reference log-probability ties a neighbour's."""
    out = []
    if got.token != want["token"]:
        out.append(f"{where}: token {got.token}, transformers {want['token']}")
    if abs(got.logprob - want["logprob"]) > LOGPROB_TOLERANCE:
        out.append(f"{where}: logprob {got.logprob:.6f}, transformers {want['logprob']:.6f} "
                   f"(off by {got.logprob - want['logprob']:.2e})")
    ref_top = want["top"]
    if len(got.top) != TOP:
        out.append(f"{where}: {len(got.top)} top entries, asked for {TOP}")
    for k, ((token, logprob), (ref_token, ref_logprob)) in enumerate(zip(got.top, ref_top)):
        if abs(logprob - ref_logprob) > LOGPROB_TOLERANCE:
            out.append(f"{where}: top {k} logprob {logprob:.6f}, transformers {ref_logprob:.6f} "
                       f"(off by {logprob - ref_logprob:.2e})")
        tied = any(abs(ref_logprob - ref_top[j][1]) <= TIE for j in (k - 1, k + 1) if 0 <= j < len(ref_top))
        if token != ref_token and not tied:
            out.append(f"{where}: top {k} token {token}, transformers {ref_token}")
    return out


def report(request, differences: list[str]) -> str:
    shown = "\n".join(differences[:30])
    more = f"\n... and {len(differences) - 30} more" if len(differences) > 30 else ""
    return (f"{len(differences)} differences from transformers; reproduce: python -m pytest "
            f"'{request.node.nodeid}'\n{shown}{more}")


# --- generation, against transformers ----------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_greedy_rows_of_mixed_lengths_in_one_batch_are_transformers_generate(engines, llama_models, name, request):
    engine, rows = engines(name), llama_models.ref(name)["rows"]
    assert {len(r["prompt_ids"]) for r in rows} >= {1, 5, 30, 100, 200}
    assert any(r["stop"] is not None for r in rows)  # one row ends on an end token
    max_tokens = llama_models.reference["max_new_tokens"]
    out = run_together(engine, [GenerationRow(tuple(r["prompt_ids"]), max_tokens, logprobs=TOP) for r in rows])
    differences = []
    for i, (row, got) in enumerate(zip(rows, out)):
        tokens, steps = expected_of(row)
        label = f"prompt {i} ({len(row['prompt_ids'])} tokens)"
        compared = steps  # past a token that differs, the two sides see different contexts
        if got["tokens"] != tokens:
            step = next((s for s, (a, b) in enumerate(zip(got["tokens"], tokens)) if a != b),
                        min(len(got["tokens"]), len(tokens)))
            gap = f"{row['steps'][step]['gap']:.2e}" if step < len(row["steps"]) else "none"
            differences.append(f"{label}: tokens differ from step {step} (transformers' top-1/top-2 logit gap "
                               f"there: {gap})\n  engine       {got['tokens']}\n  transformers {tokens}")
            compared = steps[:step + 1]
        want_finish = "length" if row["stop"] is None else "eos_token"
        if got["finish"] != want_finish:
            differences.append(f"{label}: finish {got['finish']}, transformers {want_finish}")
        for s, (entry, want) in enumerate(zip(got["logprobs"], compared)):
            differences += entry_differences(f"{label} step {s}", entry, want)
        if got["tokens"] == tokens and len(got["logprobs"]) != len(steps):
            differences.append(f"{label}: {len(got['logprobs'])} logprob entries, transformers {len(steps)}")
    assert not differences, report(request, differences)


@pytest.mark.parametrize("name", MODELS)
def test_prompt_logprobs_are_transformers_log_softmax(engines, llama_models, name, request):
    engine = engines(name)
    differences = []
    for i, row in enumerate(llama_models.ref(name)["rows"]):
        ids = row["prompt_ids"]
        got = engine.prompt_logprobs(ids, TOP)
        assert got[0] is None and len(got) == len(ids)
        for position, (entry, want) in enumerate(zip(got[1:], row["prompt_logprobs"][1:]), start=1):
            differences += entry_differences(f"prompt {i} ({len(ids)} tokens) position {position}", entry, want)
    assert not differences, report(request, differences)


@pytest.mark.parametrize("name", MODELS)
def test_int8_generates_every_row_to_its_end(engines, llama_models, name):
    engine = engines(name, "int8")
    assert engine.precision == "int8"
    max_tokens = llama_models.reference["max_new_tokens"]
    rows = llama_models.ref(name)["rows"]
    out = run_together(engine, [GenerationRow(tuple(r["prompt_ids"]), max_tokens, logprobs=1) for r in rows])
    for got in out:
        assert got["finish"] in ("length", "eos_token")
        assert len(got["tokens"]) == max_tokens if got["finish"] == "length" else len(got["tokens"]) < max_tokens
        assert len(got["logprobs"]) == len(got["tokens"]) + (got["finish"] == "eos_token")
        assert all(0 <= t < engine.vocab_size for t in got["tokens"])


# --- chat prompts ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "llama-sp", "qwen2"])
def test_chat_prompts_render_as_transformers_renders_them(llama_models, name):
    """ChatML (byte-level models) and a Zephyr template that writes the BOS itself (SentencePiece),
    over conversations with and without a system turn, several turns, an assistant turn last."""
    template = load_chat_template(llama_models.dir(name))
    chats = [c for c in llama_models.ref(name)["chats"] if c["add_generation_prompt"]]  # what render does
    assert len(chats) >= 5
    for chat in chats:
        assert template.render(chat["messages"]) == chat["text"], chat["name"]


@pytest.mark.parametrize("name", ["llama", "llama-sp", "qwen2"])
def test_chat_prompts_encode_as_transformers_tokenizes_them(engines, llama_models, name):
    """As the chat route encodes them: the template writes the special tokens (Zephyr's <s>)."""
    engine, template = engines(name), load_chat_template(llama_models.dir(name))
    for chat in llama_models.ref(name)["chats"]:
        if chat["add_generation_prompt"]:
            assert engine.encode(template.render(chat["messages"]), special_tokens=False) == chat["ids"], chat["name"]


@pytest.mark.parametrize("name", ["llama", "llama-sp", "qwen2"])
def test_prompts_encode_as_transformers_tokenizer_of_the_text(engines, llama_models, name):
    """A text prompt gets the tokenizer's own special tokens (the SentencePiece one's <s>; none
    for byte-level BPE), as transformers' `tokenizer(text)` adds them."""
    engine, encodings = engines(name), llama_models.ref(name)["encodings"]
    for case in encodings:
        assert engine.encode(case["text"]) == case["ids"], case["text"]
    assert (encodings[0]["ids"][0] == 1) == (name == "llama-sp")  # <s>


# --- detokenization ----------------------------------------------------------------------------

def streamed(decode, byte_ids, ids) -> list[str]:
    """The pieces a stream sends for `ids` arriving one at a time, and the final flush."""
    detokenizer = IncrementalDetokenizer(decode, byte_ids)
    return [detokenizer.add([token]) for token in ids] + [detokenizer.flush()]


def test_byte_fallback_pieces_stream_whole_characters(llama_models):
    """Characters the SentencePiece vocabulary lacks (CJK, an emoji, ☕) are runs of byte pieces: no
    piece of the stream holds U+FFFD, and the pieces join to transformers' decode (a stray
    continuation byte is U+FFFD in that text too, and in the stream no more than there)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(llama_models.dir("llama-sp") / "tokenizer.json"))
    byte_ids = byte_fallback_ids(tokenizer)
    assert len(byte_ids) == 256

    def decode(ids):
        return tokenizer.decode(list(ids), skip_special_tokens=False)

    cases = llama_models.ref("llama-sp")["byte_fallback"]
    assert any(sum(t in byte_ids for t in case["ids"]) >= 4 for case in cases)  # a 4-byte character
    for case in cases:
        pieces = streamed(decode, byte_ids, case["ids"])
        assert "".join(pieces) == case["text"]
        assert sum(p.count(REPLACEMENT) for p in pieces) == case["text"].count(REPLACEMENT)
    byte_level = Tokenizer.from_file(str(llama_models.dir("llama") / "tokenizer.json"))
    assert byte_fallback_ids(byte_level) == frozenset()


@pytest.mark.parametrize("name", ["llama", "llama-sp", "qwen2"])
def test_streamed_text_of_the_greedy_tokens_is_transformers_decode(engines, llama_models, name):
    """The random models' greedy tokens cut characters anywhere (byte-level) and put byte pieces in
    any order (SentencePiece): streamed one token at a time, the text is still transformers'."""
    engine = engines(name)
    assert bool(engine.byte_fallback_ids) == (name == "llama-sp")
    for row in llama_models.ref(name)["rows"]:
        tokens, _ = expected_of(row)
        assert engine.decode(tokens) == row["text"]
        assert "".join(streamed(engine.decode, engine.byte_fallback_ids, tokens)) == row["text"]


# --- the live service ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_client(engines, llama_models):
    with served_engine(engines(CHAT_MODEL), llama_models.dir(CHAT_MODEL), "tiny-qwen2") as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("finish_reason", ["length", "stop"])
def test_a_chat_through_the_openai_client_is_transformers_greedy_answer(chat_client, llama_models, finish_reason):
    """One answer that runs to max_tokens and one that ends on <|im_end|>, asked whole and streamed."""
    answer = next(a for a in llama_models.ref(CHAT_MODEL)["chat_answers"] if a["finish_reason"] == finish_reason)
    ask = dict(model="tiny-qwen2", messages=answer["messages"], max_tokens=16, temperature=0)
    usage = (len(answer["prompt_ids"]), len(answer["completion_ids"]),
             len(answer["prompt_ids"]) + len(answer["completion_ids"]))

    whole = chat_client.chat.completions.create(**ask)
    assert [(c.message.content, c.finish_reason) for c in whole.choices] == [(answer["text"], finish_reason)]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == usage

    chunks = list(chat_client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert (text, finishes) == (answer["text"], [finish_reason])
    last = chunks[-1].usage
    assert (last.prompt_tokens, last.completion_tokens, last.total_tokens) == usage


# --- building the models -----------------------------------------------------------------------

def test_the_saves_are_what_their_names_say(llama_models):
    """llama-sharded is an index and its shards, qwen2-bf16's weights are bf16 on disk (and change
    transformers' own answers, so its reference is its own), the tied model saves no head."""
    def header(path):
        with path.open("rb") as f:
            return json.loads(f.read(int.from_bytes(f.read(8), "little")))

    def new_ids(name):
        return [row["new_ids"] for row in llama_models.ref(name)["rows"]]

    sharded = sorted(p.name for p in llama_models.dir("llama-sharded").glob("model*.safetensors*"))
    assert sharded[-1] == "model.safetensors.index.json" and len(sharded) >= 3
    assert new_ids("llama-sharded") == new_ids("llama")
    bf16 = header(llama_models.dir("qwen2-bf16") / "model.safetensors")
    assert {entry["dtype"] for name, entry in bf16.items() if name != "__metadata__"} == {"BF16"}
    assert new_ids("qwen2-bf16") != new_ids("qwen2")
    assert "lm_head.weight" not in header(llama_models.dir("llama") / "model.safetensors")
    assert "lm_head.weight" in header(llama_models.dir("llama-sp") / "model.safetensors")


def test_without_the_pytorch_venv_the_build_fails_saying_why(monkeypatch, tmp_path):
    """The fixture turns this into a failure, not a skip: a missing reference is not a pass."""
    import llama_models
    from bench import torch_env

    def no_python(**kwargs):
        raise torch_env.TorchEnvError("no Python 3.11 found for the PyTorch baseline (set BENCH_TORCH_PYTHON)")

    monkeypatch.setattr(torch_env, "ensure_venv", no_python)
    with pytest.raises(llama_models.BuildError) as caught:
        llama_models.build(tmp_path)
    assert str(caught.value) == ("the PyTorch venv the Llama reference needs could not be made (bench/torch_env.py): "
                                 "TorchEnvError: no Python 3.11 found for the PyTorch baseline (set BENCH_TORCH_PYTHON)")


# --- what the converter does not know ----------------------------------------------------------

def test_an_unknown_architecture_is_refused_in_one_line_naming_those_supported(llama_models, tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"):
        shutil.copy(llama_models.dir("llama") / name, model / name)
    config = json.loads((llama_models.dir("llama") / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "mamba",
                                                   "architectures": ["MambaForCausalLM"]}))
    assert convert_model.main(["--model-dir", str(model)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"convert_model: converting {model} failed: ") and err.count("\n") == 1, err
    why = err.split(" failed: ", 1)[1]  # the path may hold any word
    assert "unsupported architecture" in why and "mamba" in why.lower(), err
    for supported in ("gpt2", "llama", "qwen2"):  # GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM
        assert supported in why.lower(), err
