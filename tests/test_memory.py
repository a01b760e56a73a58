"""Memory-aware admission, the engine side: the limit (cgroup, MEMORY_LIMIT), the budget, each
backend's `batch_bytes` against the pool it really reaches, the LiteRT pool's cap, the gauges."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fakes import FakeEngine
from service import memory
from service.engine.base import GenerationRow, OverMemoryBudget
from service.engine.litert_gpt2 import PREFILL_CHUNK
from test_api import fake_app

MiB = 2**20


# --- the limit ----------------------------------------------------------------------------


def test_cgroup_v2_limit_and_max(tmp_path):
    (tmp_path / "memory.max").write_text("1073741824\n")
    assert memory.cgroup_limit(tmp_path) == 1073741824
    (tmp_path / "memory.max").write_text("max\n")
    assert memory.cgroup_limit(tmp_path) is None


def test_cgroup_v1_limit_and_its_unlimited_value(tmp_path):
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("536870912\n")
    assert memory.cgroup_limit(tmp_path) == 536870912
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert memory.cgroup_limit(tmp_path) is None


def test_no_cgroup_files_is_no_limit(tmp_path):
    assert memory.cgroup_limit(tmp_path) is None
    assert memory.cgroup_limit(tmp_path / "absent") is None


def test_the_setting_wins_over_the_cgroup_and_none_is_none(tmp_path):
    (tmp_path / "memory.max").write_text("2147483648\n")
    assert memory.effective_limit(1 << 30, tmp_path) == (1 << 30, "MEMORY_LIMIT")
    assert memory.effective_limit(None, tmp_path) == (2147483648, f"the cgroup ({tmp_path})")
    assert memory.effective_limit(None, tmp_path / "absent") == (None, "none")


@pytest.mark.parametrize("text, expected", [
    ("1073741824", 1073741824), ("1g", 1 << 30), ("1G", 1 << 30), ("512m", 512 << 20), ("1536Mi", 1536 << 20),
    ("2GiB", 2 << 30), ("64k", 64 << 10), ("1.5g", 3 << 29), (" 300M ", 300 << 20), (4096, 4096),
])
def test_sizes_read_as_docker_reads_them(text, expected):
    assert memory.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "1x", "-1g", "0", "1 gb extra"])
def test_sizes_that_are_not_sizes_are_refused(text):
    with pytest.raises(ValueError):
        memory.parse_bytes(text)


def test_memory_limit_setting(model_dir, monkeypatch):
    from pydantic import ValidationError

    from service.config import Settings

    assert Settings(model_dir=model_dir).memory_limit is None
    assert Settings(model_dir=model_dir, memory_limit="1536Mi").memory_limit == 1536 << 20
    assert Settings(model_dir=model_dir, memory_limit=1 << 30).memory_limit == 1 << 30
    monkeypatch.setenv("MEMORY_LIMIT", "1g")  # the variable's name, as compose sets it
    assert Settings(model_dir=model_dir).memory_limit == 1 << 30
    monkeypatch.setenv("MEMORY_LIMIT", "")
    assert Settings(model_dir=model_dir).memory_limit is None
    with pytest.raises(ValidationError, match="is not a size"):
        Settings(model_dir=model_dir, memory_limit="a lot")


def test_resident_and_peak_from_proc_status(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t 9000 kB\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\n")
    assert memory.resident_bytes(status) == 1024 * 1024
    assert memory.peak_resident_bytes(status) == 2048 * 1024
    status.write_text("Name:\tpython\n")
    with pytest.raises(ValueError, match="no VmRSS"):
        memory.resident_bytes(status)


def test_budget_is_the_limit_less_the_baseline_less_the_margin():
    assert memory.margin(256 * MiB) == 64 * MiB  # the floor
    assert memory.margin(1 << 30) == int((1 << 30) * 0.08) == 85899345  # 8% past 800 MiB
    assert memory.budget(1 << 30, 600 * MiB) == (1 << 30) - 600 * MiB - 85899345
    assert memory.budget(1 << 30, 600 * MiB, margin_bytes=0) == 424 * MiB
    assert memory.budget(512 * MiB, 500 * MiB) == 0  # the baseline alone leaves nothing
    assert memory.budget(None, 600 * MiB) is None


# --- LiteRT ------------------------------------------------------------------------------


def row(prompt: int, max_tokens: int, first: int = 1) -> GenerationRow:
    return GenerationRow(tuple((first + 7 * i) % 500 for i in range(prompt)), max_tokens)


def test_litert_batch_bytes_by_the_pool_rule(litert_engine):
    """4 rows of 16 + 200: 868 slots at full length, 1,085 with headroom -> the 1,152 bucket;
    the tiny model's slot is 2 layers x 2 x 4 heads x 16 x 4 = 1,024 bytes."""
    engine = litert_engine
    assert engine.decoder.slot_bytes == 1024 and engine.cache_sizes[-1] == 4100
    rows = [row(16, 200, first=i) for i in range(4)]
    assert engine.batch_bytes(rows) == engine.pool_bytes(1152)
    # The pool once, one of its 4 tensors (a packing copy), and per slot what a call holds: the
    # mask and the kernel's slot lists (4 positions, 4 bytes each) and its scores (1 query head a
    # key/value head, per kernel thread).
    per_slot = 4 * (2 * 4 + engine.decoder.kernel_threads)
    assert engine.pool_bytes(1152) == 1024 * 1152 + 256 * 1152 + per_slot * 1153
    assert engine.pool_bytes(512) == 1024 * 512 + 256 * 512 + per_slot * 513
    assert engine.batch_bytes([]) == 0


def test_litert_batch_bytes_never_falls_as_rows_grow_or_join(litert_engine):
    engine = litert_engine
    previous = 0
    for tokens in range(1, 1000, 37):
        now = engine.batch_bytes([row(8, tokens)])
        assert now >= previous
        previous = now
    rows, previous = [], 0
    for i in range(4):
        rows.append(row(10 + 50 * i, 900 - 50 * i, first=i))
        now = engine.batch_bytes(rows)
        assert now > previous
        previous = now
    sizes = sorted(set(engine.cache_sizes) | {1, 127, 129, 1024, 1025, 4099})
    costs = [engine.pool_bytes(size) for size in sizes]
    assert costs == sorted(costs)


def run(engine, rows, between=None):
    """Rows through one batch, admitted in order while `batch_bytes` fits the budget (the
    scheduler's rule); -> (tokens per row, largest pool, most rows at once)."""
    outputs = [[] for _ in rows]
    waiting, running = list(enumerate(rows)), {}
    batch = engine.new_batch()
    largest = most = 0
    while waiting or running:
        joining = []
        while (waiting and len(running) + len(joining) < engine.max_batch_size
               and (engine.memory_budget is None
                    or engine.batch_bytes([*running.values(), *[r for _, r in joining], waiting[0][1]])
                    <= engine.memory_budget)):
            joining.append(waiting.pop(0))
        batch.extend(joining)
        running.update(joining)
        most = max(most, len(running))
        for update in batch.advance():
            outputs[update.key] += update.tokens
            if update.finish is not None:
                del running[update.key]
        largest = max(largest, engine.decoder.pool_size)
        if between is not None:
            between()
    return outputs, largest, most


def test_litert_pool_stays_within_what_batch_bytes_assumes(litert_engine):
    """Rows run to their full length: the pool they reach, and arrange's copy of it, fit the
    pool `batch_bytes` counted."""
    engine = litert_engine
    rows = [row(16, 1008, first=3), row(16, 1008, first=5), row(400, 600, first=9), row(2, 1000, first=11)]
    outputs, largest, _ = run(engine, rows)
    assert [len(o) for o in outputs] == [1008, 1008, 600, 1000]  # every row to its max_tokens
    # When the pool grows and compacts depends on measured call times: the bound must hold whatever.
    assert engine.batch_bytes(rows) == engine.pool_bytes(4100)  # 4,052 slots: the largest bucket
    assert 2048 < largest <= 4100
    outputs, largest, _ = run(engine, rows[2:])
    assert [len(o) for o in outputs] == [600, 1000]
    assert engine.batch_bytes(rows[2:]) == engine.pool_bytes(2560)  # 2,004 slots, 2,505 with headroom
    assert 1024 < largest <= 2560


@pytest.fixture(scope="module")
def small_engine(litert_model_dir):
    """An engine of its own: capping its pool must not change the session's engine."""
    from service.engine.litert_gpt2 import LiteRTGPT2Engine

    engine = LiteRTGPT2Engine(litert_model_dir, max_batch_size=4, smallest_cache=128)
    engine.warmup()
    return engine


def test_a_budget_caps_the_pool_and_admitted_rows_keep_their_tokens(small_engine):
    engine = small_engine
    rows = [row(16, 700, first=i) for i in range(4)]
    reference = [engine.generate([r])[0] for r in rows]  # each row alone, before the cap
    budget = engine.pool_bytes(1536)
    engine.set_memory_budget(budget)
    try:
        assert engine.cache_sizes[-1] == 1536
        assert engine.pool_bytes(1536) <= budget < engine.pool_bytes(1664)
        outputs, largest, most = run(engine, rows)
        assert outputs == reference
        assert largest == 1536 and most == 2  # two rows of 717 slots fit 1,536; a third waits
        engine.check_fits(0, list(range(16)), 1008)  # one full-window row fits (1,408 slots)...
        assert engine.batch_bytes([row(16, 1008)] * 2) > budget  # ...two do not (2,050)
    finally:
        engine.set_memory_budget(None)
    assert engine.cache_sizes[-1] == 4100


def test_a_budget_under_every_pool_leaves_the_smallest_and_refuses_every_row(small_engine):
    engine = small_engine
    engine.set_memory_budget(1000)
    try:
        assert engine.cache_sizes == (128,)
        with pytest.raises(OverMemoryBudget, match="could reach"):
            engine.check_fits(0, [1], 1)
    finally:
        engine.set_memory_budget(None)


def old_prompt_logprobs(engine, ids, top):
    """The replaced implementation: a second decoder, teacher-forced through `decode`."""
    from service.engine.litert_gpt2 import Decoder
    from service.engine.sampling import token_logprob

    scorer = Decoder(engine._model_path, engine._embeddings, engine._positions, 1)
    scorer.arrange([None], engine.cache_size_for(len(ids)))
    scorer.open_row(0)
    out = [None]
    for i in range(len(ids) - 1):
        logits = scorer.step(np.array([ids[i]], np.int64))[0]
        out.append(token_logprob(logits, ids[i + 1], top))
    return out


def test_prompt_logprobs_match_the_decode_signatures_and_leave_the_batch_alone(small_engine):
    engine = small_engine
    ids = [(3 + 11 * i) % 500 for i in range(37)]
    new, old = engine.prompt_logprobs(ids, 3), old_prompt_logprobs(engine, ids, 3)
    assert new[0] is None and len(new) == len(old) == 37
    for a, b in zip(new[1:], old[1:]):
        assert a.token == b.token
        assert abs(a.logprob - b.logprob) < 1e-5
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    # Scored between a running batch's decode calls, as the scheduler's worker does.
    rows = [row(5, 40, first=2), row(30, 25, first=4)]
    reference = [engine.generate([r])[0] for r in rows]
    scored = []
    outputs, _, _ = run(engine, rows, between=lambda: scored.append(engine.prompt_logprobs(ids, 3)))
    assert outputs == reference
    assert all(s == new for s in scored)
    assert engine.prompt_logprobs(ids[:1], 3) == [None]


def test_litert_gauges_follow_the_running_rows(small_engine):
    engine = small_engine
    batch = engine.new_batch()
    batch.extend([("a", row(5, 3))])
    assert engine.kv_slots_used() == 4  # the prompt but its last token, which the first call feeds
    assert engine.kv_bytes_reserved() == engine.decoder.pool_size * 1024 > 0
    batch.advance()
    assert engine.kv_slots_used() == 5
    while len(batch):
        batch.advance()
    assert engine.kv_slots_used() == 0 and engine.kv_bytes_reserved() == 0


# --- TensorFlow --------------------------------------------------------------------------


def test_tf_batch_bytes_by_its_shapes(tf_engine):
    """Batch buckets 1, 4; cache buckets 512, 1,040; prefill chunks of 16; a slot of 1,024 bytes."""
    engine = tf_engine
    assert engine.slot_bytes == 1024
    rows = [row(5, 600), row(5, 10)]
    # Batch bucket 4 x the 1,040 bucket of 605 slots, 3 copies; each prompt's prefill cache (512).
    assert engine.batch_bytes(rows) == 1024 * (3 * 4 * 1040 + 512 + 512 + 512)
    assert engine.batch_bytes([row(5, 10)]) == 1024 * (3 * 1 * 512 + 512 + 512)
    assert engine.batch_bytes([]) == 0


def test_tf_gauges_follow_the_running_rows(tf_engine):
    engine = tf_engine
    batch = engine.new_batch()
    batch.extend([("a", row(5, 20))])
    assert engine.kv_slots_used() == 5
    assert engine.kv_bytes_reserved() == 1 * 512 * 1024
    while len(batch):
        batch.advance()
    assert engine.kv_slots_used() == 0 and engine.kv_bytes_reserved() == 0


# --- the runtime and /metrics ------------------------------------------------------------


def gauges(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    names = ("llm_memory_limit_bytes", "llm_kv_budget_bytes", "llm_kv_slots_used", "llm_kv_bytes_reserved")
    return {f.name: f.samples[0].value for f in text_string_to_metric_families(text) if f.name in names}


class SizedEngine(FakeEngine):
    """A fake whose rows cost 1 MiB each, with a pool the gauges report."""

    def batch_bytes(self, rows):
        return len(rows) * MiB

    def kv_slots_used(self):
        return 7

    def kv_bytes_reserved(self):
        return 7168


def test_the_budget_is_set_before_serving_and_reported(model_dir, caplog):
    engine = SizedEngine()
    caplog.set_level(logging.INFO, logger="service.runtime")
    with TestClient(fake_app(model_dir, engine, memory_limit="8g")) as client:
        text = client.get("/metrics").text
    resident = next(r for r in caplog.records if "MiB resident after warm-up" in r.getMessage())
    assert engine.memory_budget == (8 << 30) - memory.margin(8 << 30) - resident.args[2] * MiB
    assert gauges(text) == {"llm_memory_limit_bytes": 8 << 30, "llm_kv_budget_bytes": engine.memory_budget,
                            "llm_kv_slots_used": 7, "llm_kv_bytes_reserved": 7168}
    assert "about 64 full-window row(s) at once (of MAX_BATCH_SIZE=64)" in resident.getMessage()


def test_a_budget_under_one_full_row_warns(model_dir, caplog):
    engine = SizedEngine()
    caplog.set_level(logging.INFO, logger="service.runtime")
    with TestClient(fake_app(model_dir, engine, memory_limit="1m")) as client:
        text = client.get("/metrics").text
    assert engine.memory_budget == 0
    assert gauges(text)["llm_kv_budget_bytes"] == 0 and gauges(text)["llm_memory_limit_bytes"] == 1 << 20
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "the largest requests will be refused (4xx)" in warning.getMessage()


def test_no_limit_no_budget(model_dir, caplog, monkeypatch):
    # This machine's own cgroup may have a limit: none is found where there is no cgroup tree.
    monkeypatch.setattr(memory.effective_limit, "__defaults__", (Path("/nonexistent"),))
    engine = SizedEngine()
    caplog.set_level(logging.INFO, logger="service.runtime")
    with TestClient(fake_app(model_dir, engine)) as client:
        text = client.get("/metrics").text
    assert engine.memory_budget is None
    assert gauges(text)["llm_kv_budget_bytes"] == 0 and gauges(text)["llm_memory_limit_bytes"] == 0
    assert any("no key/value budget" in r.getMessage() for r in caplog.records)


def test_rows_wait_for_room_in_the_budget_and_one_that_never_fits_is_refused(model_dir):
    engine = SizedEngine()
    with TestClient(fake_app(model_dir, engine, memory_limit="8g")) as client:
        while client.get("/health").status_code != 200:  # warm-up sets the budget: set ours after it
            time.sleep(0.01)
        engine.memory_budget = int(1.5 * MiB)  # one row at a time
        both = client.post("/generate", json={"prompts": ["abc", "xy"], "max_tokens": 5})
        metrics = gauges(client.get("/metrics").text)
        engine.memory_budget = MiB // 2  # no row fits, even alone
        refused = client.post("/generate", json={"prompts": ["ok", "abc"], "max_tokens": 5})
        refused_v1 = client.post("/v1/completions", json={"model": client.get("/v1/models").json()["data"][0]["id"],
                                                            "prompt": "abc", "max_tokens": 5})
    assert (both.status_code, both.json()) == (200, {"results": ["cba", "yx"]})
    assert max(len(keys) for keys in engine.calls) == 1, engine.calls
    assert metrics["llm_kv_budget_bytes"] == int(1.5 * MiB)
    assert refused.status_code == 422
    assert [(d["type"], d["loc"]) for d in refused.json()["detail"]] == [
        ("over_memory_budget", ["body", "max_tokens"])] * 2
    assert "more than this server's budget of 0.5 MiB" in refused.json()["detail"][0]["msg"]
    assert refused.json()["detail"][0]["ctx"] == {"needed_bytes": MiB, "budget_bytes": MiB // 2}
    assert refused_v1.status_code == 400
    assert refused_v1.json()["error"]["code"] == "over_memory_budget"
    assert refused_v1.json()["error"]["param"] == "max_tokens"


def test_a_growing_pool_gives_back_the_pages_its_heads_moved_from(small_engine):
    """A pool of [K, S, D] that grows moves each head's slots to its new place; the pages the
    heads left behind would stay resident as free slots of the larger pool, so they are given
    back (they read as zeros) while the kept slots keep their values."""
    decoder = small_engine.decoder
    decoder.arrange([None], 256)
    decoder.open_row(0)
    decoder.prefill(0, list(range(1, 201)))
    kept = {name: decoder._decode.inputs[name][:, :200].copy() for name in decoder.cache_names()}
    decoder.arrange([0], 4100)
    per_page = 4096 // (decoder.head_dim * decoder.cache_dtype.itemsize)
    for name in decoder.cache_names():
        pool = decoder._decode.inputs[name]
        np.testing.assert_array_equal(pool[:, :200], kept[name])
        assert not pool[:, 200 + per_page:].any()  # past the page that holds the last kept slot
    decoder.close_row(0)


def test_a_prompts_keys_leave_the_extend_pool_once_prefilled_and_the_budget_counts_them(small_engine):
    """The extend signature's pool holds a prompt's keys and values while it is prefilled (up to
    a full window's, sized at warm-up); then its pages go back, and the budget counts them as
    resident through `prompt_reserve_bytes`."""
    engine, decoder = small_engine, small_engine.decoder
    window_pool = (engine.context_window - 1) // PREFILL_CHUNK * PREFILL_CHUNK  # the last chunk's start
    assert engine.prompt_reserve_bytes >= window_pool * decoder.n_head * decoder.head_dim * 4 * 4 - 4 * 4096
    decoder.arrange([None], 512)
    decoder.open_row(0)
    decoder.prefill(0, list(range(1, 301)))
    for name in decoder.cache_names():
        assert not decoder._extend.inputs[name].any()
    decoder.close_row(0)
