"""LiteRT: conversion (files, manifest, idempotence, atomicity, errors), the int8 quality gate both
ways, backend selection, and what is particular to the LiteRT engine (int8, sampling, tokenizer).

The exactness tests against transformers run on LiteRT through the parametrized `engine` fixture
(test_engine.py, test_api.py)."""

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

import convert_model
from conftest import reference_tokens
from service.config import Settings
from service.engine import GenerationRow, quality
from service.engine.litert_gpt2 import LiteRTGPT2Engine
from service.engine.litert_runtime import CustomOp, Program
from service.engine.native import kvattn
from service.engine.sampling import next_token
from service.model_files import LITERT_FILES, LITERT_META, has_litert_files, read_manifest, sha256_of, verify_manifest


def copy_model(src, dst, litert=False):
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and (litert or f.name not in LITERT_FILES + ("manifest.json",)):
            shutil.copy(f, dst / f.name)
    return dst


# --- conversion -------------------------------------------------------------------------------

def test_conversion_writes_every_file_and_records_it_in_the_manifest(litert_model_dir):
    manifest = read_manifest(litert_model_dir)
    for name in LITERT_FILES:
        assert manifest["files"][name] == {"size": (litert_model_dir / name).stat().st_size,
                                           "sha256": sha256_of(litert_model_dir / name)}
    assert "tf_model.h5" in manifest["files"]
    verify_manifest(litert_model_dir)
    meta = json.loads((litert_model_dir / LITERT_META).read_text())
    assert meta["source_sha256"] == convert_model.source_fingerprint(litert_model_dir)
    assert meta["models"] == {"fp32": "decoder.fp32.tflite", "int8": "decoder.int8.tflite"}
    assert (meta["n_layer"], meta["n_head"], meta["n_embd"], meta["vocab_size"]) == (2, 4, 64, 512)
    assert not (litert_model_dir / ".litert-tmp").exists()


def _decode_program(path: Path) -> tuple[list[str], dict[str, int]]:
    """The decode signature's operators (builtin names, or a custom op's code) and its inputs'
    tensor types (TFLite's TensorType numbers), read from the flatbuffer."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(path.read_bytes(), 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    signature = next(model.SignatureDefs(i) for i in range(model.SignatureDefsLength())
                     if model.SignatureDefs(i).SignatureKey() == b"decode")
    graph = model.Subgraphs(signature.SubgraphIndex())
    ops = []
    for i in range(graph.OperatorsLength()):
        code = model.OperatorCodes(graph.Operators(i).OpcodeIndex())
        ops.append(code.CustomCode().decode() if code.CustomCode() else names[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())])
    types = {signature.Inputs(i).Name().decode(): graph.Tensors(signature.Inputs(i).TensorIndex()).Type()
             for i in range(signature.InputsLength())}
    return ops, types


@pytest.mark.parametrize("precision, cache", [("fp32", "FLOAT32"), ("int8", "FLOAT16")])
def test_decode_attends_with_the_custom_op_over_the_files_cache_precision(litert_model_dir, precision, cache):
    """Each layer's attention in the decode program is one KVAttention op (no batched matmul
    reads the pool), and the pool's inputs are the file's cache precision: float16 with int8."""
    from tensorflow.lite.python import schema_py_generated as schema

    ops, types = _decode_program(litert_model_dir / f"decoder.{precision}.tflite")
    assert ops.count("KVAttention") == 2 and "BATCH_MATMUL" not in ops and "SOFTMAX" not in ops
    pools = {name: kind for name, kind in types.items() if name.startswith(("key_", "value_"))}
    assert pools == {name: getattr(schema.TensorType, cache) for name in ("key_0", "value_0", "key_1", "value_1")}
    assert types["mask"] == types["embeds"] == schema.TensorType.FLOAT32


@pytest.mark.parametrize("vocab, width, bound, slices", [
    (512, 64, 2_900, 12), (512, 64, 1 << 22, 1), (50_257, 768, 1 << 22, 10), (151_936, 896, 1 << 22, 33), (7, 3, 9, 3)])
def test_the_lm_head_is_cut_in_the_fewest_slices_within_the_bound(monkeypatch, vocab, width, bound, slices):
    from service.engine import litert_convert

    monkeypatch.setattr(litert_convert, "HEAD_SLICE_WEIGHTS", bound)
    ranges = litert_convert.head_slices(vocab, width)
    assert len(ranges) == slices
    assert [start for start, _ in ranges] == [0] + [end for _, end in ranges[:-1]] and ranges[-1][1] == vocab
    assert all((end - start) * width <= bound for start, end in ranges)


def test_the_head_signature_gives_the_logits_in_slices_the_engine_joins_in_order(litert_model_dir):
    engine = LiteRTGPT2Engine(litert_model_dir, precision="fp32")
    names = engine.decoder._head.output_names
    assert sorted(names) == sorted(f"logits_{i}" for i in range(12))
    hidden = np.random.default_rng(0).standard_normal([3, 64]).astype(np.float32)
    logits = engine.decoder.head(hidden)
    outputs = engine.decoder._head.outputs
    assert logits.shape == (3, 512)
    np.testing.assert_array_equal(logits, np.concatenate([outputs[f"logits_{i}"] for i in range(12)], axis=1))


def test_a_second_conversion_of_the_same_weights_does_nothing(litert_model_dir, capsys):
    before = {name: (litert_model_dir / name).stat().st_mtime_ns for name in LITERT_FILES + ("manifest.json",)}
    assert convert_model.main(["--model-dir", str(litert_model_dir)]) == 0
    assert capsys.readouterr().out == (f"convert_model: {litert_model_dir} already holds LiteRT files for these "
                                       "weights; nothing to do\n")
    assert before == {name: (litert_model_dir / name).stat().st_mtime_ns for name in before}


def test_new_weights_are_converted_again(litert_model_dir, tmp_path):
    model = copy_model(litert_model_dir, tmp_path / "m", litert=True)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "layer_norm_epsilon": 2e-5}))
    (model / "manifest.json").unlink()  # as a download of new weights would rewrite it
    (model / "gpt2.int8.tflite").write_bytes(b"an earlier format's model file")
    assert not convert_model.is_converted(model, convert_model.source_fingerprint(model))
    meta = convert_model.convert_model_dir(model)
    assert "skipped" not in meta and meta["source_sha256"] == convert_model.source_fingerprint(model)
    assert not (model / "gpt2.int8.tflite").exists()  # the old file goes once the new ones are in place


def test_an_interrupted_conversion_never_looks_complete(model_dir, tmp_path, monkeypatch, capsys):
    model = copy_model(model_dir, tmp_path / "m")

    def interrupted(*args):
        raise RuntimeError("killed halfway")

    monkeypatch.setattr(quality, "compare", interrupted)  # after the .tflite files are written
    assert convert_model.main(["--model-dir", str(model)]) == 1
    err = capsys.readouterr().err
    assert err == f"convert_model: converting {model} failed: RuntimeError: killed halfway\n"
    assert not has_litert_files(model)
    assert not any((model / name).exists() for name in LITERT_FILES)
    assert not (model / ".litert-tmp").exists()
    assert Settings(model_dir=model).serving_backend == "tf"


def test_files_the_manifest_does_not_list_are_not_a_conversion(litert_model_dir, tmp_path):
    model = copy_model(litert_model_dir, tmp_path / "m", litert=True)
    manifest = read_manifest(model)
    del manifest["files"][LITERT_META]
    (model / "manifest.json").write_text(json.dumps(manifest))
    assert not has_litert_files(model)


def test_a_failure_exits_1_with_one_line(tmp_path, capsys):
    assert convert_model.main(["--model-dir", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err == f"convert_model: model directory {tmp_path / 'nope'} does not exist\n"


# --- the quality gate -------------------------------------------------------------------------

def test_wide_random_weights_fail_the_gate_and_serve_fp32(litert_model_dir, litert_engine):
    gate = json.loads((litert_model_dir / LITERT_META).read_text())["quality"]
    assert gate["int8_enabled"] is False
    assert gate["agreement"] < quality.MIN_AGREEMENT
    assert gate["reason"].startswith("int8 rejected: top-1 agreement")
    assert gate["tokens"] == 8 * 511  # eight windows of 512 tokens, each predicting 511
    assert litert_engine.precision == "fp32"


def test_weights_that_quantize_losslessly_pass_the_gate_and_serve_int8(model_dir, tmp_path):
    """Blocks that pass the residual stream through unchanged (zero weights) and embeddings on an
    int8 grid: int8 holds the weights exactly, so only activation rounding remains."""
    import tensorflow as tf
    from transformers import TFGPT2LMHeadModel

    model_path = copy_model(model_dir, tmp_path / "m")
    model = TFGPT2LMHeadModel.from_pretrained(model_path)
    rng = np.random.default_rng(0)
    for weight in model.weights:
        if "wte" in weight.name:
            weight.assign(rng.integers(-127, 128, size=weight.shape) * np.float32(0.1 / 127))
        elif "/ln_" not in weight.name:
            weight.assign(tf.zeros(weight.shape))
    model.save_pretrained(model_path)
    gate = convert_model.convert_model_dir(model_path)["quality"]
    assert gate["int8_enabled"] is True, gate
    assert gate["agreement"] >= quality.MIN_AGREEMENT and gate["perplexity_rise"] < quality.MAX_PERPLEXITY_RISE
    engine = LiteRTGPT2Engine(model_path, max_batch_size=4)
    assert engine.precision == "int8"
    assert LiteRTGPT2Engine(model_path, precision="fp32", max_batch_size=4).precision == "fp32"


@pytest.mark.parametrize("agreement, rise, enabled", [
    (0.98, 0.0299, True), (0.9799, 0.0, False), (1.0, 0.03, False), (0.5, 0.5, False)])
def test_the_gate_s_thresholds(agreement, rise, enabled):
    report = quality.judge(agreement, 10.0, 10.0 * (1 + rise), 100)
    assert report.int8_enabled is enabled
    assert report.perplexity_rise == pytest.approx(rise)


def test_the_gate_reads_each_position_with_the_text_before_it(litert_engine):
    """Teacher forcing through the decode path scores each token after all those before it:
    the same log-probabilities as the prompt's own (one causal `extend` call), which a gate that
    left its rows closed (each token seeing only itself) did not give."""
    rng = np.random.default_rng(7)
    tokens = rng.integers(1, litert_engine.vocab_size, (3, 40))
    _, logprob = quality.teacher_forced(litert_engine.decoder, tokens)
    for row, text in zip(logprob, tokens):
        expected = [entry.logprob for entry in litert_engine.prompt_logprobs(text.tolist(), 0)[1:]]
        np.testing.assert_allclose(row, expected, rtol=0, atol=1e-4)


def test_the_gate_text_is_a_few_thousand_tokens(litert_engine):
    ids = litert_engine.encode(quality.TEXT.read_text())
    assert len(ids) >= 8 * 512
    assert quality.windows(ids, 1024).shape == (8, 512)
    assert quality.windows(ids[:3000], 1024).shape == (8, 375)


# --- choosing the backend ---------------------------------------------------------------------

def test_auto_serves_litert_where_converted_and_tf_elsewhere(model_dir, litert_model_dir):
    assert Settings(model_dir=model_dir).serving_backend == "tf"
    assert Settings(model_dir=litert_model_dir).serving_backend == "litert"
    assert Settings(model_dir=litert_model_dir, backend="tf").serving_backend == "tf"


def test_litert_without_its_files_is_refused_with_the_command_to_run(model_dir):
    with pytest.raises(ValidationError) as caught:
        Settings(model_dir=model_dir, backend="litert")
    assert f"run: python scripts/convert_model.py --model-dir {model_dir}" in str(caught.value)


@pytest.mark.parametrize("backend", ["litert", "auto"])
def test_files_of_another_converter_version_are_refused_with_the_command_to_run(litert_model_dir, tmp_path, backend):
    model = copy_model(litert_model_dir, tmp_path / "m", litert=True)
    meta = json.loads((model / LITERT_META).read_text())
    (model / LITERT_META).write_text(json.dumps({**meta, "converter_version": 3}))
    (model / "manifest.json").unlink()  # the old files' manifest would list them as they were
    with pytest.raises(ValidationError) as caught:
        Settings(model_dir=model, backend=backend)
    assert (f"the LiteRT files in {model} are converter version 3, this service reads version "
            f"{convert_model.CONVERTER_VERSION}; run: python scripts/convert_model.py --model-dir {model}") in str(caught.value)
    assert not convert_model.is_converted(model, convert_model.source_fingerprint(model))  # the converter redoes them


def test_the_environment_error_is_one_line(model_dir, monkeypatch):
    from service.config import load_settings

    monkeypatch.setenv("MODEL_DIR", str(model_dir))
    monkeypatch.setenv("BACKEND", "litert")
    with pytest.raises(SystemExit) as caught:
        load_settings()
    assert str(caught.value) == (f"service: invalid settings: BACKEND=litert, but {model_dir} holds no finished "
                                 f"LiteRT conversion; run: python scripts/convert_model.py --model-dir {model_dir}")


# --- the LiteRT engine ------------------------------------------------------------------------

def test_int8_can_be_forced_and_is_logged(litert_model_dir, caplog):
    engine = LiteRTGPT2Engine(litert_model_dir, precision="int8", max_batch_size=4)
    assert engine.precision == "int8"
    assert "serving int8 although the quality gate rejected it" in caplog.text
    rows = [GenerationRow(tuple(engine.encode(p)), 20, t, 5, i)
            for i, (p, t) in enumerate([("def f(x):", 0.0), ("Hello", 0.8), ("", 1.0)])]
    together = engine.generate(rows)
    assert all(len(o) <= 20 for o in together) and sum(len(o) for o in together) > 20
    assert [engine.generate([row])[0] for row in rows] == together  # rows do not depend on neighbours


def test_tokenizer_matches_the_tensorflow_backend(litert_engine, tf_engine):
    text = "naïve café — 日本語 🎉🚀\n\tdef f(x):  return x"
    assert litert_engine.encode(text) == tf_engine.encode(text)
    assert litert_engine.decode(litert_engine.encode(text)) == text
    assert litert_engine.encode("") == [litert_engine.eos_id]


def test_sampling_depends_only_on_the_row_s_own_seed_stream_and_index():
    logits = np.random.default_rng(1).normal(size=300).astype(np.float32)
    draws = [next_token(logits, GenerationRow((0,), 1, 1.0, 42, 0), i) for i in range(50)]
    assert draws == [next_token(logits, GenerationRow((0,), 1, 1.0, 42, 0), i) for i in range(50)]
    assert draws != [next_token(logits, GenerationRow((0,), 1, 1.0, 42, 1), i) for i in range(50)]
    assert draws != [next_token(logits, GenerationRow((0,), 1, 1.0, 43, 0), i) for i in range(50)]
    assert next_token(logits, GenerationRow((0,), 1, 0.0, 42, 0), 0) == int(np.argmax(logits))
    assert next_token(logits, GenerationRow((0,), 1, 1e-4, 42, 0), 0) == int(np.argmax(logits))


@pytest.mark.parametrize("top_p", [5e-324, 1e-17])
def test_a_top_p_so_small_that_1_minus_it_is_1_keeps_only_the_likeliest(top_p):
    """The fuzzer's find: top_p = 5e-324 (schema-valid, > 0) left no bin heavier than 1 - top_p."""
    logits = np.random.default_rng(2).normal(size=3000).astype(np.float32)
    for top_k in (0, 50):
        draws = {next_token(logits, GenerationRow((0,), 1, 2.0, 7, 0, top_k=top_k, top_p=top_p), i) for i in range(20)}
        assert draws == {int(np.argmax(logits))}


def test_extreme_penalties_and_temperatures_stay_finite_and_take_their_limits():
    """Also the fuzzer's: repetition_penalty 5e-324 (0 in float32) and tiny temperatures made
    infinite logits and NaN weights."""
    import warnings

    logits = np.random.default_rng(3).normal(size=300).astype(np.float32)
    seen = int(np.argsort(logits)[-5])  # a likely token, not the likeliest
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division by zero, no NaN
        greedy = next_token(logits, GenerationRow((seen,), 1, 0.0, 1, 0, repetition_penalty=5e-324), 0, [seen])
        assert greedy == seen  # an unbounded reward for the seen token
        for temperature in (1e-38, 2.2e-16):
            row = GenerationRow((seen,), 1, temperature, 1, 0, repetition_penalty=5e-324)
            assert next_token(logits, row, 0, [seen]) == seen
            assert next_token(logits, GenerationRow((0,), 1, temperature, 1, 0, top_k=5), 0) == int(np.argmax(logits))


def test_metrics_name_the_backend_and_precision(litert_model_dir):
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(Settings(model_dir=litert_model_dir, max_batch_size=4))) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
        assert client.get("/health").json() == {"status": "ok", "backend": "litert", "precision": "fp32"}
        assert 'llm_backend_info{backend="litert",precision="fp32"} 1' in client.get("/metrics").text


def test_a_hole_is_compacted_once_it_has_cost_what_a_rearrangement_costs(litert_engine):
    """The ski-rental rule, with the decoder's timings set by hand."""
    from service.engine import GenerationRow

    engine, decoder = litert_engine, litert_engine.decoder
    batch = engine.new_batch()
    batch.extend([(0, GenerationRow((5, 6, 7), 50)), (1, GenerationRow((8, 9), 1))])
    batch.filter([u.key for u in batch.step() if u.finish is None])  # row 1 ends: a hole
    assert batch.keys == [0] and decoder.batch_size == 2
    decoder.arrange_seconds_per_slot = 3600.0  # a rearrangement would cost hours: keep the hole
    for _ in range(5):
        batch.step()
    assert decoder.batch_size == 2
    decoder.arrange_seconds_per_slot = 0.0  # free: the next call compacts first
    compactions = engine.compactions
    batch.step()
    assert decoder.batch_size == 1 and engine.compactions == compactions + 1


def test_compacting_holes_is_priced_at_two_rearrangements_and_spare_slots_at_one(litert_engine):
    """A hole compacted away comes back as a position when the next row joins, so dropping holes
    costs two rearrangements; a pool with spare slots and no holes costs one; nothing to drop, never."""
    engine, decoder = litert_engine, litert_engine.decoder
    batch = engine.new_batch()
    batch.extend([(0, GenerationRow((5, 6, 7), 50)), (1, GenerationRow((8, 9), 1))])
    decoder.arrange_seconds_per_slot = 0.001
    one = decoder.used_slots * 0.001
    assert batch._compaction_cost() == (one if batch._spare_slots() else math.inf)
    batch.filter([u.key for u in batch.step() if u.finish is None])  # row 1 ends: a hole
    assert batch._holes() and batch._compaction_cost() == 2 * decoder.used_slots * 0.001


def test_joining_prompts_count_as_filled_slots_for_the_headroom_so_short_answers_never_grow_the_pool(
        litert_engine, hf_model):
    """A pool gets a quarter more than its filled slots, and a joining batch's prompts count as
    filled: long prompts with short answers get a pool that holds the answers at once, and it
    does not grow while they decode (it grew after 16 calls when only the slots filled before
    the join got the share)."""
    engine, decoder = litert_engine, litert_engine.decoder
    ids = engine.encode(LONG_TEXT)
    rows = {f"r{i}": GenerationRow(tuple(ids[i: i + 300]), 40) for i in range(2)}
    prompts = 2 * 299  # each prompt less the token its first call takes in
    batch = engine.new_batch()
    batch.extend(list(rows.items()))
    pool = engine.cache_size_for(prompts + prompts // 4)
    assert decoder.pool_size == pool >= prompts + 2 * 40
    pools, out = set(), {key: [] for key in rows}
    while len(batch):
        for u in batch.advance():
            out[u.key] += u.tokens
        pools.add(decoder.pool_size)
    assert pools == {pool}
    for key, row in rows.items():
        assert out[key] == reference_tokens(hf_model, row.prompt_ids, 40, engine.eos_id)


@pytest.mark.parametrize("capacity", [None, 4100])
def test_a_pool_changing_shape_keeps_its_rows_tokens(litert_engine, hf_model, capacity):
    """`arrange` to a larger pool (the rows stay where they are), then to a smaller one than the
    kept slots' extent (they are packed at its start). Within a reservation (`capacity`) the
    slots move inside the pool's memory; without one, a larger pool is new memory and the old
    goes. Either way the rows' tokens are unchanged."""
    import weakref

    from service.engine.litert_gpt2 import Decoder

    engine = litert_engine
    decoder = Decoder(engine._model_path, engine._embeddings, engine._positions, 1, capacity=capacity)
    rows = [GenerationRow(tuple(engine.encode(LONG_TEXT)[:n]), 12) for n in (50, 30)]
    decoder.arrange([None, None], engine.cache_sizes[0])
    tokens, feed = [[], []], []
    for b, row in enumerate(rows):
        decoder.open_row(b)
        decoder.prefill(b, row.prompt_ids[:-1])
        feed.append(row.prompt_ids[-1])

    def step():
        logits = decoder.step(np.array(feed, np.int64))
        for b in np.flatnonzero(decoder.live):
            feed[b] = int(np.argmax(logits[b]))
            tokens[b].append(feed[b])

    for _ in range(4):
        step()
    address = decoder._decode.inputs["key_0"].ctypes.data
    before = weakref.ref(decoder._decode.inputs["key_0"].base)
    decoder.arrange([0, 1], engine.cache_sizes[1])
    assert decoder.pool_size == engine.cache_sizes[1]
    if capacity:
        assert decoder._decode.inputs["key_0"].ctypes.data == address  # in place
    else:
        assert before() is None  # the old memory went
    for _ in range(4):
        step()
    decoder.close_row(0)  # the first row's slots were the lowest: the second's now start past them
    assert min(decoder.slots[1]) == len(rows[0].prompt_ids) - 1
    extent = 1 + max(decoder.slots[1])
    small = 64
    assert len(decoder.slots[1]) < small < extent
    address = decoder._decode.inputs["value_0"].ctypes.data
    decoder.arrange([1], small)
    assert decoder._decode.inputs["value_0"].ctypes.data == address
    assert decoder.slots[0] == list(range(len(decoder.slots[0])))
    feed = [feed[1]]
    for _ in range(4):
        logits = decoder.step(np.array(feed, np.int64))
        feed[0] = int(np.argmax(logits[0]))
        tokens[1].append(feed[0])
    assert tokens[0] == reference_tokens(hf_model, rows[0].prompt_ids, 8, engine.eos_id)
    assert tokens[1] == reference_tokens(hf_model, rows[1].prompt_ids, 12, engine.eos_id)


@pytest.mark.parametrize("chunk", [16, 7])
def test_a_prompt_prefilled_in_chunks_is_the_prompt_prefilled_in_one_call(litert_engine, monkeypatch, chunk):
    """The chunks' keys and values are laid out in the extend signature's pool input in place,
    growing it a chunk at a time (heads moved apart): the keys, values and hidden states equal
    one call's over the whole prompt."""
    from service.engine import litert_gpt2

    decoder = litert_engine.decoder
    ids = litert_engine.encode(LONG_TEXT)[:150]

    def encoded(size):
        monkeypatch.setattr(litert_gpt2, "PREFILL_CHUNK", size)
        parts, hidden = decoder.encode_prompt(ids, range(len(ids)))
        return [np.concatenate([pool, last], axis=1) for pool, last in parts], hidden

    whole, whole_hidden = encoded(len(ids))
    chunked, chunked_hidden = encoded(chunk)
    assert [k.shape for k in chunked] == [k.shape for k in whole]
    assert max(float(np.abs(a - b).max()) for a, b in zip(chunked, whole)) < 1e-5
    assert np.abs(chunked_hidden - whole_hidden).max() < 1e-4


# --- the runtime (service/engine/litert_runtime.py) -----------------------------------------

@pytest.mark.parametrize("precision, cache", [("fp32", np.float32), ("int8", np.float16)])
def test_the_runtime_reads_each_signature_s_inputs_as_the_file_declares_them(litert_model_dir, precision, cache):
    kernel = kvattn.load(1)
    program = Program(litert_model_dir / f"decoder.{precision}.tflite", 1,
                      custom_ops=[CustomOp(kernel.name, kernel.kernel, kernel.user_data)])
    assert set(program.signatures) == {"extend", "decode", "head"}
    decode = program.signature("decode")
    heads, open_, head_dim = decode.declared("key_0")
    assert open_ == 1  # the pool's open dimension
    pools = [name for name in decode.input_names if name.startswith(("key_", "value_"))]
    assert {name: decode.dtype(name) for name in decode.input_names} == {
        **dict.fromkeys(decode.input_names, np.float32), **dict.fromkeys(pools, cache)}
    assert program.signature("extend").dtype("rows") == np.int32
    width = decode.declared("embeds")[2]
    decode.resize({**{name: [heads, 5, head_dim] for name in pools}, "mask": [1, 2, 6], "embeds": [2, 1, width]})
    assert decode.inputs["key_0"].dtype == cache
    decode.run()
    assert kernel.errors() == 0
    assert decode.outputs["hidden"].shape == (2, width)
    assert decode.outputs["key_0"].shape == (heads, 2, head_dim)
    assert decode.outputs["key_0"].dtype == np.float32


def test_a_model_whose_custom_op_has_no_kernel_is_refused_by_name(litert_model_dir):
    program = Program(litert_model_dir / "decoder.fp32.tflite", 1)
    with pytest.raises(RuntimeError, match="unresolved custom op: KVAttention"):
        program.signature("decode").resize({"key_0": [4, 5, 16]})


def test_a_failing_litert_call_is_named_with_its_status(litert_model_dir):
    with pytest.raises(RuntimeError, match=r"LiteRtCreateModelFromFile .* failed: LiteRtStatus \d+"):
        Program(litert_model_dir / "config.json", 1)
    with pytest.raises(RuntimeError, match=r"LiteRtAddCustomOpKernelOption \(Missing\) failed: LiteRtStatus 1 "):
        Program(litert_model_dir / "decoder.fp32.tflite", 1, custom_ops=[CustomOp("Missing", kernel=0)])
    program = Program(litert_model_dir / "decoder.fp32.tflite", 1)
    head = program.signature("head")
    with pytest.raises(RuntimeError, match=r"LiteRtCompiledModelResizeInputTensor \(head's hidden to \[2, 5\]\)"):
        head.resize({"hidden": [2, 5]})  # its width is fixed
    head.resize({"hidden": [2, head.declared("hidden")[1]]})
    program.close()
    with pytest.raises(RuntimeError, match="closed"):
        head.run()


# --- the short lane ----------------------------------------------------------------------------

LONG_TEXT = "the cat sat on the mat and then " * 60
SHORT_PROMPT = "def add(a, b):"


def long_rows(engine, count=2, max_tokens=40):
    ids = engine.encode(LONG_TEXT)
    return {f"long{i}": GenerationRow(tuple(ids[i: i + 300]), max_tokens) for i in range(count)}


def run_with_joiner(engine, running, joiner, join_after=3):
    """Decode `running`, let `joiner` (key "short") join after `join_after` calls, and run to the
    end. Returns every key's tokens, whether the joiner ran in the lane, and each call's keys."""
    batch = engine.new_batch()
    batch.extend(list(running.items()))
    out = {key: [] for key in [*running, "short"]}
    calls, in_lane = [], None
    while len(batch):
        if len(calls) == join_after:
            batch.extend([("short", joiner)])
            in_lane = "short" in batch.lane_keys
        updates = batch.advance()
        calls.append({u.key for u in updates})
        for u in updates:
            out[u.key] += u.tokens
    return out, in_lane, calls


@pytest.fixture
def lane_pays(litert_engine, monkeypatch):
    """Timings that make the lane pay (a lane call costs nothing), whatever the machine."""
    monkeypatch.setattr(litert_engine, "lane_call_seconds", 0.0)
    return litert_engine


def test_a_short_row_beside_long_ones_gets_calls_of_its_own_and_decodes_as_alone(lane_pays, hf_model):
    engine = lane_pays
    running = long_rows(engine)
    joiner = GenerationRow(tuple(engine.encode(SHORT_PROMPT)), 12)
    lane_rows, lane_calls = engine.lane_rows, engine.lane_calls
    out, in_lane, calls = run_with_joiner(engine, running, joiner)
    assert in_lane
    assert engine.lane_rows == lane_rows + 1
    for key, row in running.items():
        assert out[key] == reference_tokens(hf_model, row.prompt_ids, 40, engine.eos_id)
    assert out["short"] == reference_tokens(hf_model, joiner.prompt_ids, 12, engine.eos_id)
    lane_only = [keys for keys in calls if keys == {"short"}]  # calls the long rows sat out
    assert len(lane_only) == engine.lane_calls - lane_calls > 0
    batch_calls = [keys for keys in calls if "long0" in keys]
    assert len(batch_calls) == 40  # the long rows still got every token from the batch's calls


def test_seeded_sampling_in_the_short_lane_is_the_same_as_alone(lane_pays):
    engine = lane_pays
    sampled = GenerationRow(tuple(engine.encode(SHORT_PROMPT)), 24, 1.0, 4321, 3)
    alone = engine.generate([sampled])[0]
    out, in_lane, _ = run_with_joiner(engine, long_rows(engine), sampled)
    assert in_lane and out["short"] == alone


def test_a_row_like_the_running_ones_shares_their_calls(lane_pays):
    engine = lane_pays
    like = GenerationRow(tuple(engine.encode(LONG_TEXT)[5:305]), 12)  # as long as the running rows
    assert not run_with_joiner(engine, long_rows(engine), like)[1]
    many = GenerationRow(tuple(engine.encode(SHORT_PROMPT)), 65)  # more new tokens than a short request
    assert not run_with_joiner(engine, long_rows(engine), many)[1]


def test_no_lane_when_its_calls_would_not_be_cheaper_or_it_is_off(litert_engine, monkeypatch):
    engine = litert_engine
    joiner = GenerationRow(tuple(engine.encode(SHORT_PROMPT)), 12)
    monkeypatch.setattr(engine, "lane_call_seconds", 3600.0)  # a lane call would cost an hour
    assert not run_with_joiner(engine, long_rows(engine), joiner)[1]
    monkeypatch.setattr(engine, "lane_call_seconds", 0.0)
    monkeypatch.setattr(engine, "short_lane", False)
    assert not run_with_joiner(engine, long_rows(engine), joiner)[1]


def test_lane_calls_take_at_most_the_batch_s_call_time_between_two_of_its_calls(lane_pays, monkeypatch):
    """Running rows keep at least half their speed: between two batch calls, the lane's calls
    start only while they have taken less time than the batch's last call."""
    engine, decoder = lane_pays, lane_pays.decoder
    timeline = []

    def timed(kind, call):  # the call's time as the decoder records it (a wrapper's own would add to it)
        def wrapper(*args):
            result = call(*args)
            timeline.append((kind, decoder.last_step_seconds if kind == "batch" else decoder.last_apart_seconds))
            return result
        return wrapper

    monkeypatch.setattr(decoder, "step", timed("batch", decoder.step))
    monkeypatch.setattr(decoder, "step_apart", timed("lane", decoder.step_apart))
    run_with_joiner(engine, long_rows(engine, max_tokens=30), GenerationRow(tuple(engine.encode(SHORT_PROMPT)), 30))
    assert {kind for kind, _ in timeline} == {"batch", "lane"}
    batch_call, lane_since = None, 0.0
    for kind, seconds in timeline:
        if kind == "batch":
            batch_call, lane_since = seconds, 0.0
        else:
            assert lane_since < batch_call
            lane_since += seconds
