"""The benchmark runs end to end at a tiny size and writes a complete, self-consistent result.

Nothing here asserts a timing: on a shared 2-core machine those belong in the report, not in a
test. The run needs the PyTorch baseline's venv (bench/.venv-torch), which the benchmark makes
on first use from the torch wheel on this machine's disk (about a minute); set
BENCH_TEST_SKIP_TORCH=1 to run without the PyTorch baseline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import config
from bench.load import percentile
from bench.server import parse_labels, parse_metrics

REPO = Path(__file__).resolve().parent.parent
SKIP_TORCH = os.environ.get("BENCH_TEST_SKIP_TORCH") == "1"


def test_parse_metrics_sums_label_sets_and_skips_comments():
    text = (
        "# HELP llm_generated_tokens_total New tokens.\n"
        "# TYPE llm_generated_tokens_total counter\n"
        "llm_generated_tokens_total 128\n"
        'llm_requests_total{status="ok"} 3\n'
        'llm_requests_total{status="503"} 2\n'
        "llm_warmup_seconds 12.5\n"
    )
    assert parse_metrics(text) == {
        "llm_generated_tokens_total": 128.0,
        "llm_requests_total": 5.0,
        "llm_warmup_seconds": 12.5,
    }


def test_percentile_interpolates_like_numpy():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(1, 21))), 95) == pytest.approx(19.05)


def test_parse_labels_reads_backend_info():
    text = ('# TYPE llm_backend_info gauge\nllm_backend_info{backend="litert",precision="int8"} 1\n'
            "llm_ready 1\n")
    assert parse_labels(text, "llm_backend_info") == [{"backend": "litert", "precision": "int8"}]
    assert parse_labels(text, "llm_other") == []


def test_full_preset_matches_the_issue():
    preset = config.make_preset("full")
    by_role = {s.role: s for s in preset.scenarios}
    assert preset.model_shape == "distilgpt2" and preset.max_tokens == 64
    assert (by_role["single"].clients, by_role["batch"].clients, by_role["overload"].clients) == (1, 8, 32)
    assert by_role["single"].prompts == (config.SHORT_PROMPT,)
    assert by_role["batch_sampled"].temperature > 0 and by_role["batch"].temperature == 0
    # Issue 7: 8 identical short prompts at 8 clients, and long prompts with 128 new tokens.
    assert by_role["same"].clients == 8 and set(by_role["same"].prompts) == {config.SHORT_PROMPT}
    assert len(by_role["same"].prompts) == 8 and by_role["same"].max_tokens == 64
    assert (by_role["long_single"].clients, by_role["long_batch"].clients) == (1, 8)
    assert by_role["long_single"].max_tokens == by_role["long_batch"].max_tokens == 128
    runs = {r.name: r for r in preset.torch_runs}
    assert runs["same_b8"].prompts == (config.SHORT_PROMPT,) * len(runs["same_b8"].prompts)
    assert runs["same_b8"].batch_size == runs["long_b8"].batch_size == 8 and runs["long_b1"].batch_size == 1
    assert set(runs["long_b8"].prompts) == set(by_role["long_batch"].prompts)
    assert set(runs["long_b1"].prompts) == set(by_role["long_single"].prompts)
    # Whole rounds of the prompts, so per-request token counts compare with the baselines.
    for s in preset.scenarios:
        assert s.requests % len(s.prompts) == 0
    # Each backend runs what its bars need; int8 runs everything.
    assert preset.scenarios_for(config.BACKENDS["litert-int8"]) == preset.scenarios
    assert {s.role for s in preset.scenarios_for(config.BACKENDS["litert-fp32"])} == {"single", "batch"}
    assert "long_batch" not in {s.role for s in preset.scenarios_for(config.BACKENDS["tf"])}
    assert [b.name for b in config.parse_backends("tf, litert-int8")] == ["tf", "litert-int8"]
    with pytest.raises(ValueError):
        config.parse_backends("litert-fp16")


def test_long_prompts_are_about_400_tokens():
    """With the DistilGPT2-shape test tokenizer (trained here, as make_test_model.py does: ~10 s)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from make_test_model import train_tokenizer
    finally:
        sys.path.pop(0)
    tokenizer = train_tokenizer(50257)
    counts = [len(tokenizer(p)["input_ids"]) for p in config.LONG_PROMPTS]
    assert len(set(config.LONG_PROMPTS)) == 8
    assert all(360 <= c <= 440 for c in counts), counts
    assert 380 <= sum(counts) / len(counts) <= 420, counts
    assert len(tokenizer(config.SHORT_PROMPT)["input_ids"]) == 16


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "bench", "--preset", "tiny", "--cache-dir", str(out / "cache"),
           "--results-dir", str(out / "results")]
    if SKIP_TORCH:
        cmd.append("--no-torch")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads((out / "results" / "latest.json").read_text())
    result["_markdown"] = (out / "results" / "latest.md").read_text()
    return result


def test_tiny_run_serves_every_backend(tiny_result):
    assert list(tiny_result["phases"]) == list(config.DEFAULT_BACKENDS)
    preset = config.make_preset("tiny")
    for name, phase in tiny_result["phases"].items():
        backend = config.BACKENDS[name]
        assert phase["health"]["backend"] == backend.backend
        if backend.precision:
            assert phase["health"]["precision"] == backend.precision
        assert set(phase["scenarios"]) == {s.name for s in preset.scenarios_for(backend)}
        service = phase["service"]
        assert service["warmup_seconds"] > 0 and service["vmhwm_since_start_mib"] > 0
        assert service["compiles_after_warmup"] in (0, None)
        for s in phase["scenarios"].values():
            assert s["ok"] == s["requests"] and s["errors"] == 0, s["error_samples"]
            assert s["new_tokens"] > 0 and s["tok_per_s"] > 0 and s["req_per_s"] > 0
            assert 0 < s["latency_p50_s"] <= s["latency_p95_s"]
            assert s["vmhwm_mib"] > 0
    assert tiny_result["litert"]["seconds"] >= 0
    machine = tiny_result["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"]


def test_tiny_run_baselines_do_the_same_work(tiny_result):
    expected = {"tf:short_b1", "tf:mixed_b1"}
    if not SKIP_TORCH:
        expected |= {f"pt:{r.name}" for r in config.make_preset("tiny").torch_runs}
    assert set(tiny_result["baselines"]) == expected
    for b in tiny_result["baselines"].values():
        assert b["new_tokens"] > 0 and b["tok_per_s"] > 0
    for name, phase in tiny_result["phases"].items():
        checks = phase["checks"]
        assert checks["token_counts"], name
        determinism = checks["greedy_deterministic"]
        assert determinism["prompts"] > 0
        if config.BACKENDS[name].exact_text:
            # fp32 greedy tokens are transformers' (the engine tests assert it), so texts match;
            # int8 weights change the numbers and are compared on token counts alone.
            assert all(c["equal"] for c in checks["token_counts"]), (name, checks["token_counts"])
            for fw, texts in checks["greedy_texts"].items():
                assert texts["identical"] == texts["prompts"] > 0, (name, fw)
            assert determinism["prompts"] == determinism["same_text_every_request"], name
    if not SKIP_TORCH:
        assert tiny_result["torch"]["cuda"] is None
        assert tiny_result["torch"]["logits_check"]["max_abs_diff"] < 1e-3


def test_tiny_run_reports_every_bar(tiny_result):
    ids = {name: {b["id"] for b in p["bars"]} for name, p in tiny_result["phases"].items()}
    assert ids["litert-int8"] == {
        "single_vs_torch_b1", "batch_vs_torch_b8", "same_vs_torch_b8", "long_single_vs_torch_b1",
        "long_batch_vs_torch_b8", "overload_errors", "overload_vs_batch", "peak_rss", "warmup", "sampling_cost",
        "compiles_after_warmup"}
    assert ids["litert-fp32"] == {"single_vs_torch_b1"}
    assert ids["tf"] == {"single_vs_torch_b1", "batch_vs_torch_b8", "batch_vs_naive_tf", "overload_errors",
                         "overload_vs_batch", "sampling_cost", "peak_rss", "warmup", "compiles_after_warmup"}
    for name, phase in tiny_result["phases"].items():
        by_id = {b["id"]: b for b in phase["bars"]}
        if "overload_errors" in by_id:
            assert by_id["overload_errors"]["holds"] is True, name
    assert len(tiny_result["bars"]) == sum(len(v) for v in ids.values())
    md = tiny_result["_markdown"]
    assert "| backend | bar | measured | target | holds |" in md
    for phase in tiny_result["phases"].values():
        for name in phase["scenarios"]:
            assert name in md


def test_tiny_run_profiles_the_int8_decode_step(tiny_result):
    profile = tiny_result["profile"]
    assert profile and "error" not in profile, profile
    assert profile["step_ms"] > 0 and profile["op_sum_ms"] > 0
    assert any(k.startswith("FULLY_CONNECTED") for k in profile["by_type"])
    assert "BATCH_MATMUL" in profile["by_type"]
    assert "Per-op profile" in tiny_result["_markdown"]
    assert [p.get("cache") for p in tiny_result["profiles"]] == [256, 640]
