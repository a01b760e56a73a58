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
from bench.server import parse_metrics

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


def test_full_preset_matches_the_issue():
    preset = config.make_preset("full")
    by_role = {s.role: s for s in preset.scenarios}
    assert preset.model_shape == "distilgpt2" and preset.max_tokens == 64
    assert (by_role["single"].clients, by_role["batch"].clients, by_role["overload"].clients) == (1, 8, 32)
    assert by_role["single"].prompts == (config.SHORT_PROMPT,)
    assert by_role["batch_sampled"].temperature > 0 and by_role["batch"].temperature == 0
    # Whole rounds of the mixed prompts, so per-request token counts compare with the baselines.
    for s in preset.scenarios:
        assert s.requests % len(s.prompts) == 0


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


def test_tiny_run_reports_every_scenario(tiny_result):
    preset = config.make_preset("tiny")
    assert set(tiny_result["scenarios"]) == {s.name for s in preset.scenarios}
    for s in tiny_result["scenarios"].values():
        assert s["ok"] == s["requests"] and s["errors"] == 0, s["error_samples"]
        assert s["new_tokens"] > 0 and s["tok_per_s"] > 0 and s["req_per_s"] > 0
        assert 0 < s["latency_p50_s"] <= s["latency_p95_s"]
        assert s["vmhwm_mib"] > 0
        assert s["compiles_after_warmup"] == 0


def test_tiny_run_service_facts(tiny_result):
    service = tiny_result["service"]
    assert service["warmup_seconds"] > 0
    assert service["compiles_after_warmup"] == 0
    machine = tiny_result["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"]


def test_tiny_run_baselines_do_the_same_work(tiny_result):
    expected = {"tf:short_b1", "tf:mixed_b1"} | (set() if SKIP_TORCH else {"pt:short_b1", "pt:mixed_b1", "pt:mixed_b8"})
    assert set(tiny_result["baselines"]) == expected
    for b in tiny_result["baselines"].values():
        assert b["new_tokens"] > 0 and b["tok_per_s"] > 0
    counts = tiny_result["checks"]["token_counts"]
    assert counts and all(c["equal"] for c in counts), counts
    # The service's greedy tokens are transformers' (its own tests assert it), so texts match.
    for fw, texts in tiny_result["checks"]["greedy_texts"].items():
        assert texts["identical"] == texts["prompts"] > 0, fw
    determinism = tiny_result["checks"]["greedy_deterministic"]
    assert determinism["prompts"] == determinism["same_text_every_request"] > 0
    if not SKIP_TORCH:
        assert tiny_result["torch"]["cuda"] is None
        assert tiny_result["torch"]["logits_check"]["max_abs_diff"] < 1e-3


def test_tiny_run_reports_every_bar(tiny_result):
    ids = {b["id"] for b in tiny_result["bars"]}
    assert ids == {"single_vs_torch_b1", "batch_vs_torch_b8", "batch_vs_naive_tf", "overload_errors",
                   "overload_throughput", "sampling_cost", "peak_rss", "warmup", "compiles_after_warmup"}
    by_id = {b["id"]: b for b in tiny_result["bars"]}
    assert by_id["compiles_after_warmup"]["holds"] is True
    assert by_id["overload_errors"]["holds"] is True
    md = tiny_result["_markdown"]
    assert "| bar | measured | target | holds |" in md
    for name in tiny_result["scenarios"]:
        assert name in md
