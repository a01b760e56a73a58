"""Both backends' decode loops against transformers' own `generate` on the same tiny model.

`engine` is parametrized (conftest.py): each test runs on TensorFlow/XLA and on LiteRT fp32."""

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import ENGINE_OPTIONS, reference_tokens
from service.engine import GenerationRow

PROMPTS = [
    "",  # the start-of-text token alone
    "x",
    "def add(a, b):\n    return a + b\n",
    "import os\nimport sys\n\nclass Loader(object):\n    \"\"\"Load things from paths.\"\"\"\n    def __init__(self, path):",
    "The quick brown fox jumps over the lazy dog. " * 6,  # several prefill chunks
]


def rows_for(engine, prompts, max_tokens, temperature=0.0, seed=0):
    return [GenerationRow(tuple(engine.encode(p)), m, temperature, seed, i)
            for i, (p, m) in enumerate(zip(prompts, max_tokens))]


def test_prompts_span_the_chunk_boundaries_the_tests_mean_to_cross(engine):
    lengths = [len(engine.encode(p)) for p in PROMPTS]
    assert lengths[0] == 1 and lengths[1] == 1
    assert lengths[2] < 16 < lengths[3] and lengths[4] > 32


def test_a_smaller_batch_runs_in_the_next_bucket_up(engine, reference):
    batch = PROMPTS[2:4]  # 2 rows in the batch-4 shape
    assert engine.generate(rows_for(engine, batch, [12, 12])) == [reference(p, 12) for p in batch]


def test_greedy_batch_with_different_lengths_matches_generate_alone(engine, reference):
    batch = PROMPTS[1:]  # 4 rows: one batch of the largest bucket
    out = engine.generate(rows_for(engine, batch, [24] * 4))
    assert out == [reference(p, 24) for p in batch]
    assert all(len(o) == 24 for o in out)


def test_greedy_batch_with_different_max_tokens_matches_generate_alone(engine, reference):
    batch = PROMPTS[:3]
    budgets = [1, 40, 17]  # rows finish inside, at and across decode chunks
    compactions = engine.compactions
    out = engine.generate(rows_for(engine, batch, budgets))
    assert out == [reference(p, m) for p, m in zip(batch, budgets)]
    assert [len(o) for o in out] == budgets
    # XLA: batch 4 -> 1 once the third row is done (after 32 steps), compiled shapes being 1 and 4.
    # LiteRT: finished rows leave holes, compacted once they have cost what compacting does
    # (timed, so not at all, once or twice here; tests/test_litert.py holds the rule to account).
    assert engine.compactions - compactions in ({"tf": {1}, "litert": {0, 1, 2}}[engine.backend])


def test_a_long_prompt_and_a_long_continuation_in_one_request(engine, hf_model):
    """Each row keeps its own positions, so a long prompt with few new tokens and a short one
    with many share a batch."""
    long_prompt = "a b c d e f g h " * 100
    ids = engine.encode(long_prompt)[:1000]
    rows = [GenerationRow(tuple(ids), 8), GenerationRow(tuple(engine.encode("x")), 300)]
    out = engine.generate(rows)
    expect_long = reference_tokens(hf_model, ids, 8, engine.eos_id)
    assert out[0] == expect_long
    assert out[1][:20] == reference_tokens(hf_model, engine.encode("x"), 20, engine.eos_id)
    assert len(out[1]) == 300


def test_sampling_is_reproducible_and_independent_of_batch_neighbours(engine):
    prompt = PROMPTS[2]
    alone = engine.generate(rows_for(engine, [prompt], [30], temperature=1.0, seed=1234))
    again = engine.generate(rows_for(engine, [prompt], [30], temperature=1.0, seed=1234))
    assert alone == again
    neighbours = [GenerationRow(tuple(engine.encode(p)), 30, 0.7, 99, 5) for p in PROMPTS[3:]]
    mixed = engine.generate(neighbours + rows_for(engine, [prompt], [30], temperature=1.0, seed=1234))
    assert mixed[-1] == alone[0]
    other_seed = engine.generate(rows_for(engine, [prompt], [30], temperature=1.0, seed=1235))
    assert other_seed != alone


def test_a_tiny_temperature_is_greedy(engine, reference):
    out = engine.generate(rows_for(engine, [PROMPTS[3]], [20], temperature=1e-4, seed=7))
    assert out == [reference(PROMPTS[3], 20)]


def test_sampling_draws_from_softmax_of_logits_over_temperature(engine, hf_model):
    """The first token's empirical distribution over 512 seeds against the model's softmax."""
    ids = engine.encode(PROMPTS[2])
    logits = hf_model(tf.constant([ids])).logits.numpy()[0, -1].astype(np.float64)

    def softmax(t):
        p = np.exp((logits - logits.max()) / t)
        return p / p.sum()

    def distance(counts, p):
        return 0.5 * np.abs(counts / counts.sum() - p).sum()

    n, temperature = 512, 1.5
    draws = []
    for start in range(0, n, 4):
        rows = [GenerationRow(tuple(ids), 1, temperature, seed, 0) for seed in range(start, start + 4)]
        draws += [o[0] if o else engine.eos_id for o in engine.generate(rows)]  # [] is end-of-text
    counts = np.bincount(draws, minlength=len(logits)).astype(float)
    # What sampling noise alone gives for n draws from the true distribution.
    rng = np.random.default_rng(0)
    noise = [distance(rng.multinomial(n, softmax(temperature)).astype(float), softmax(temperature))
             for _ in range(200)]
    assert distance(counts, softmax(temperature)) <= max(noise)
    for wrong in (1.0, 2.25):
        assert distance(counts, softmax(temperature)) < distance(counts, softmax(wrong))


@pytest.fixture(scope="module")
def eos_model(litert_model_dir, reference, tmp_path_factory):
    """The tiny model (with its LiteRT files) with end-of-text moved to a token its greedy output
    emits early."""
    prompt = PROMPTS[3]
    greedy = reference(prompt, 30)
    position = next(i for i in range(3, 30) if greedy[i] not in greedy[:i])
    stop_token = greedy[position]
    out = tmp_path_factory.mktemp("eos-model")
    for f in litert_model_dir.iterdir():
        if f.is_file() and f.name != "manifest.json":
            shutil.copy(f, out / f.name)
    for name in ("config.json", "generation_config.json", "litert.json"):
        data = json.loads((out / name).read_text())
        data["eos_token_id"] = stop_token
        (out / name).write_text(json.dumps(data))
    return out, prompt, greedy[:position], stop_token


def make_engine(backend, path):
    if backend == "tf":
        from service.engine.tf_gpt2 import TFGPT2Engine

        return TFGPT2Engine(path, **ENGINE_OPTIONS)
    from service.engine.litert_gpt2 import LiteRTGPT2Engine

    return LiteRTGPT2Engine(path, max_batch_size=ENGINE_OPTIONS["max_batch_size"])


def test_a_row_stops_at_end_of_text(engine, eos_model, hf_model, xla_cache):
    path, prompt, before_stop, stop_token = eos_model
    eos_engine = make_engine(engine.backend, path)
    assert eos_engine.eos_id == stop_token
    rows = [GenerationRow(tuple(eos_engine.encode(prompt)), 30),
            GenerationRow(tuple(eos_engine.encode(prompt)), 30, 0.9, 3, 0)]
    out = eos_engine.generate(rows)
    assert out[0] == before_stop
    assert out[0] == reference_tokens(hf_model, eos_engine.encode(prompt), 30, stop_token)
    assert stop_token not in out[1]


@pytest.fixture(scope="module")
def eos_list_model(litert_model_dir, reference, tmp_path_factory):
    """The tiny model whose generation_config.json lists two end-of-sequence ids (as Qwen2's lists
    end-of-turn and end-of-text), each a token that one prompt's greedy output emits early and
    the other prompt's does not before its own; config.json and litert.json keep GPT-2's."""
    def firsts(greedy):  # (position, token) of tokens at their first appearance
        return [(i, t) for i, t in enumerate(greedy) if i >= 3 and t not in greedy[:i]]

    a, b = PROMPTS[3], PROMPTS[2]
    greedy_a, greedy_b = reference(a, 30), reference(b, 30)
    i, j, stop_a, stop_b = next((i, j, ta, tb) for i, ta in firsts(greedy_a) for j, tb in firsts(greedy_b)
                                if ta != tb and tb not in greedy_a[:i + 1] and ta not in greedy_b[:j + 1])
    out = tmp_path_factory.mktemp("eos-list-model")
    for f in litert_model_dir.iterdir():
        if f.is_file() and f.name != "manifest.json":
            shutil.copy(f, out / f.name)
    data = json.loads((out / "generation_config.json").read_text())
    data["eos_token_id"] = [stop_a, stop_b]
    (out / "generation_config.json").write_text(json.dumps(data))
    return out, (a, greedy_a[:i], stop_a), (b, greedy_b[:j], stop_b)


def test_a_row_stops_on_each_end_of_sequence_id_generation_config_lists(engine, eos_list_model, xla_cache):
    path, *cases = eos_list_model
    eos_engine = make_engine(engine.backend, path)
    assert eos_engine.eos_id == engine.eos_id  # the primary stays config.json's (warm-up pads with it)
    assert eos_engine.eos_ids == {engine.eos_id} | {stop for _, _, stop in cases}
    rows = [GenerationRow(tuple(eos_engine.encode(prompt)), 30) for prompt, _, _ in cases]
    assert eos_engine.generate(rows) == [before_stop for _, before_stop, _ in cases]  # each < 30: ended on its id


def test_end_of_sequence_ids_come_from_generation_config_else_config(tmp_path):
    from service.model_files import ModelDirError, end_of_sequence_ids

    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 151643}))
    assert end_of_sequence_ids(tmp_path) == (151643, {151643})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    assert end_of_sequence_ids(tmp_path) == (151643, {151645, 151643})
    assert end_of_sequence_ids(tmp_path, primary=2) == (2, {2, 151645, 151643})  # the primary always ends a row
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))  # Llama 3's
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    assert end_of_sequence_ids(tmp_path) == (128001, {128001, 128009})
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelDirError):
        end_of_sequence_ids(tmp_path)


def test_no_compiles_after_warmup(engine):
    engine.generate(rows_for(engine, PROMPTS, [3] * 5))
    assert engine.compiles_after_warmup() == 0


def test_encode_decode_round_trips_unicode(engine):
    text = "naïve café — 日本語 🎉🚀"
    assert engine.decode(engine.encode(text)) == text
    assert engine.encode("") == [engine.eos_id]


# --- Rows joining and leaving a running batch (continuous batching) ----------------------------

def drive(engine, first, joins):
    """Run a batch that starts with `first` (key -> row); `joins(generated)` is asked before every
    decode call, with the tokens each key has so far, and returns the rows that join then.
    Returns every key's tokens and the number of decode calls."""
    batch = engine.new_batch()
    batch.extend(list(first.items()))
    out = {key: [] for key in first}
    calls = 0
    while True:
        joining = joins(out)
        for key, _ in joining:
            out[key] = []
        batch.extend(joining)
        if not len(batch):
            break
        for update in batch.advance():
            out[update.key] += update.tokens
        calls += 1
    return out, calls


def once(when, entries):
    """A `joins` callback: these rows join the first time `when(generated)` holds."""
    done = []

    def joins(out):
        if not done and when(out):
            done.append(True)
            return entries
        return []

    return joins


def test_a_row_joining_a_running_batch_with_a_longer_prompt_matches_generate_alone(engine, reference):
    running = {0: GenerationRow(tuple(engine.encode(PROMPTS[1])), 40),
               1: GenerationRow(tuple(engine.encode(PROMPTS[2])), 40)}
    joiner = GenerationRow(tuple(engine.encode(PROMPTS[4])), 20)  # longer than both running prompts
    assert len(joiner.prompt_ids) > max(len(r.prompt_ids) for r in running.values())
    out, _ = drive(engine, running, once(lambda out: len(out[0]) >= 5, [(2, joiner)]))
    assert out[0] == reference(PROMPTS[1], 40)
    assert out[1] == reference(PROMPTS[2], 40)
    assert out[2] == reference(PROMPTS[4], 20)


def smallest_cache(engine) -> int:
    return engine.cache_sizes[0] if engine.backend == "litert" else engine.buckets.cache_sizes[0]


def test_a_row_joining_when_the_running_row_is_near_the_end_of_its_cache_bucket(engine, hf_model):
    """The running row fills all but a few slots of the smallest cache bucket when another joins,
    and crosses into the next bucket while both run."""
    bucket = smallest_cache(engine)
    words = engine.encode("the cat sat on the mat and then " * 200)
    long_ids = tuple(words[: bucket - 20])
    running = {0: GenerationRow(long_ids, 30)}
    joiner = GenerationRow(tuple(engine.encode(PROMPTS[3])), 24)
    # LiteRT decodes a token a call, XLA up to a chunk (16): join once 15+ slots are filled.
    out, _ = drive(engine, running, once(lambda out: len(out[0]) >= 15, [(1, joiner)]))
    assert out[0] == reference_tokens(hf_model, long_ids, 30, engine.eos_id)
    assert out[1] == reference_tokens(hf_model, joiner.prompt_ids, 24, engine.eos_id)


def test_seeded_sampling_is_the_same_whatever_joins_or_leaves_beside_it(engine):
    sampled = GenerationRow(tuple(engine.encode(PROMPTS[2])), 48, 1.0, 4321, 3)
    alone = engine.generate([sampled])[0]
    assert len(alone) > 20  # long enough to see the joins and leaves
    neighbours = [GenerationRow(tuple(engine.encode(p)), m, t, 7, i)
                  for i, (p, m, t) in enumerate([(PROMPTS[4], 5, 0.8), (PROMPTS[1], 30, 0.0), (PROMPTS[3], 9, 1.3)])]
    schedule = {0: [(1, neighbours[0])], 3: [(2, neighbours[1]), (3, neighbours[2])]}
    calls = []

    def joins(out):
        calls.append(None)
        return schedule.pop(len(calls) - 1, [])

    out, _ = drive(engine, {0: sampled}, joins)
    assert out[0] == alone
    assert [len(out[k]) for k in (1, 2, 3)] == [len(o) for o in engine.generate(neighbours)]


def test_a_row_joining_right_after_another_left_takes_its_place_and_matches_alone(engine, reference):
    """A row that finished leaves a place (LiteRT: a hole in the batch's shape) that a row
    joining soon after takes in place; both rows still decode as alone."""
    first = {0: GenerationRow(tuple(engine.encode(PROMPTS[3])), 40),
             1: GenerationRow(tuple(engine.encode(PROMPTS[1])), 3)}
    joiner = GenerationRow(tuple(engine.encode(PROMPTS[2])), 12)
    shapes = []

    def joins(out):
        if engine.backend == "litert":
            shapes.append(engine.decoder.batch_size)
        # Row 1 finishes after 3 tokens (LiteRT: 3 calls; XLA: within its first call).
        return [(2, joiner)] if len(out[1]) == 3 and 2 not in out else []

    compactions = engine.compactions
    out, _ = drive(engine, first, joins)
    assert out[0] == reference(PROMPTS[3], 40)
    assert out[1] == reference(PROMPTS[1], 3)
    assert out[2] == reference(PROMPTS[2], 12)
    if engine.backend == "litert":
        assert max(shapes) == 2  # the joining row took the finished row's place: no third row
        assert engine.compactions - compactions <= 1  # at most when row 2 left for good


# --- Sampling controls and log-probabilities ---------------------------------------------------

def test_greedy_with_a_repetition_penalty_is_transformers_generate(engine, hf_model):
    ids = engine.encode(PROMPTS[2])
    out = engine.generate([GenerationRow(tuple(ids), 30, repetition_penalty=1.3)])[0]
    ref = hf_model.generate(tf.constant([ids]), max_new_tokens=30, do_sample=False, repetition_penalty=1.3,
                            pad_token_id=engine.eos_id, attention_mask=tf.ones([1, len(ids)], tf.int32))
    new = [int(t) for t in ref.numpy()[0][len(ids):]]
    assert out == (new[: new.index(engine.eos_id)] if engine.eos_id in new else new)
    assert out != engine.generate([GenerationRow(tuple(ids), 30)])[0]  # the penalty changed something


def log_softmax(x):
    x = x.astype(np.float64) - x.max()
    return x - np.log(np.exp(x).sum())


def test_logprobs_are_transformers_log_softmax(engine, hf_model):
    ids = engine.encode(PROMPTS[3])
    batch = engine.new_batch()
    batch.extend([(0, GenerationRow(tuple(ids), 12, 0.9, 7, 0, logprobs=3)), (1, GenerationRow(tuple(ids), 5))])
    tokens, logprobs = [], []
    while 0 in batch.keys:
        for u in batch.advance():
            if u.key == 0:
                tokens += u.tokens
                logprobs += u.logprobs
    assert len(logprobs) == len(tokens) + (len(tokens) < 12)  # end-of-text has its entry too
    reference = hf_model(tf.constant([ids + tokens])).logits.numpy()[0]
    for i, entry in enumerate(logprobs):
        expected = log_softmax(reference[len(ids) - 1 + i])
        assert entry.token == (tokens + [engine.eos_id])[i]
        assert abs(entry.logprob - expected[entry.token]) < 1e-4
        assert [t for t, _ in entry.top] == list(np.argsort(-expected, kind="stable")[:3])
        assert all(abs(lp - expected[t]) < 1e-4 for t, lp in entry.top)


def test_prompt_logprobs_are_transformers_log_softmax(engine, hf_model):
    ids = engine.encode(PROMPTS[3])
    out = engine.prompt_logprobs(ids, 2)
    reference = hf_model(tf.constant([ids])).logits.numpy()[0]
    assert out[0] is None and len(out) == len(ids)
    for i in range(1, len(ids)):
        expected = log_softmax(reference[i - 1])
        assert out[i].token == ids[i] and abs(out[i].logprob - expected[ids[i]]) < 1e-4
        assert [t for t, _ in out[i].top] == list(np.argsort(-expected, kind="stable")[:2])


def filtered_softmax(logits, temperature, top_k=0, top_p=1.0):
    """transformers' TopK and TopP warpers on logits / temperature, as probabilities."""
    x = logits / temperature
    if top_k:
        x = np.where(x < np.sort(x)[-top_k], -np.inf, x)
    if top_p < 1:
        p = np.exp(x - x.max())
        p /= p.sum()
        order = np.argsort(p)
        remove = np.cumsum(p[order]) <= 1 - top_p
        remove[-1] = False
        x[order[remove]] = -np.inf
    p = np.exp(x - x.max())
    return p / p.sum()


@pytest.mark.parametrize("controls", [dict(top_k=5), dict(top_p=0.6), dict(top_k=8, top_p=0.8)])
def test_top_k_and_top_p_draw_from_the_filtered_softmax(engine, hf_model, controls):
    ids = engine.encode(PROMPTS[2])
    logits = hf_model(tf.constant([ids])).logits.numpy()[0, -1].astype(np.float64)
    expected = filtered_softmax(logits, 1.3, **controls)
    n = 400
    draws = []
    for start in range(0, n, 4):
        rows = [GenerationRow(tuple(ids), 1, 1.3, seed, 0, **controls) for seed in range(start, start + 4)]
        draws += [o[0] if o else engine.eos_id for o in engine.generate(rows)]
    counts = np.bincount(draws, minlength=len(logits)).astype(float)
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(expected))  # nothing filtered out is drawn
    rng = np.random.default_rng(0)
    noise = [0.5 * np.abs(rng.multinomial(n, expected) / n - expected).sum() for _ in range(200)]
    assert 0.5 * np.abs(counts / n - expected).sum() <= max(noise)


def test_seeded_rows_with_controls_do_not_depend_on_their_neighbours(engine):
    row = GenerationRow(tuple(engine.encode(PROMPTS[2])), 24, 1.0, 99, 2, top_k=20, top_p=0.9,
                        repetition_penalty=1.2)
    alone = engine.generate([row])[0]
    neighbours = [GenerationRow(tuple(engine.encode(p)), 10, 0.7, 3, i) for i, p in enumerate(PROMPTS[3:])]
    assert engine.generate(neighbours + [row])[-1] == alone


def test_a_row_whose_sampling_fails_ends_alone_and_the_others_go_on(engine, reference, monkeypatch):
    from service.engine import litert_gpt2, sampling

    real = sampling.next_token

    def next_token(logits, row, *args):
        if row.seed == 666 and args[0] == 2:  # the failing row's third token
            raise FloatingPointError("no finite logits")
        return real(logits, row, *args)

    monkeypatch.setattr(sampling, "next_token", next_token)
    monkeypatch.setattr(litert_gpt2, "next_token", next_token)
    bad = GenerationRow(tuple(engine.encode(PROMPTS[2])), 20, 0.9, 666, 0, top_k=5)
    good = rows_for(engine, PROMPTS[3:4], [20])[0]
    batch = engine.new_batch()
    batch.extend([("bad", bad), ("good", good)])
    made, errors = {"bad": [], "good": []}, []
    while batch.keys:
        for update in batch.advance():
            made[update.key] += update.tokens
            if update.error is not None:
                errors.append((update.key, str(update.error), update.finish))
    assert errors == [("bad", "no finite logits", None)]
    assert len(made["bad"]) == 2
    assert made["good"] == reference(PROMPTS[3], 20)
