"""The benchmark runs end to end at a tiny size and writes a complete, self-consistent result.

Nothing here asserts a timing: on a shared 2-core machine those belong in the report, not in a
test. The run needs the PyTorch baseline's venv (bench/.venv-torch), which the benchmark makes
on first use from the torch wheel on this machine's disk (about a minute); set
BENCH_TEST_SKIP_TORCH=1 to run without the PyTorch baseline.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench import config, plots, report, stream
from bench.client import StreamOutcome, parse_event, time_per_output_token
from bench.load import percentile, run_load
from bench.server import histogram_quantile, histogram_window, parse_histogram, parse_labels, parse_metrics

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
    # 8 rows filling the window, last: its peak is held to the default container limit.
    assert preset.scenarios[-1] is by_role["window"] and by_role["window"].clients == 8
    assert by_role["window"].max_tokens + 80 <= 1024 and not by_role["window"].checks_texts
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
    # Issue 8: 4 streams of 512 greedy tokens beside a 16-token request; 8 uneven clients
    # (think 0-500 ms, 16-256 tokens); 128 tokens streamed and not. Only int8 runs them.
    hol, uneven, overhead = preset.stream_scenarios
    assert (hol.long_clients, hol.long_max_tokens, hol.short_max_tokens, hol.short_prompt) == (
        4, 512, 16, config.SHORT_PROMPT)
    assert hol.repetitions >= 3 and hol.idle_repetitions >= 3
    assert (uneven.clients, uneven.max_tokens_range, uneven.think_max_s) == (8, (16, 256), 0.5)
    assert (overhead.max_tokens, overhead.prompt) == (128, config.SHORT_PROMPT) and overhead.repetitions >= 5
    assert preset.stream_scenarios_for(config.BACKENDS["litert-int8"]) == preset.stream_scenarios
    assert preset.stream_scenarios_for(config.BACKENDS["tf"]) == ()
    assert preset.stream_scenarios_for(config.BACKENDS["litert-fp32"]) == ()


def test_llama_preset_runs_the_short_scenarios_on_litert_against_pytorch_b1_and_b8():
    preset = config.make_preset("llama")
    assert (preset.model_shape, preset.family, preset.max_tokens) == ("smollm2-135m", "llama", 64)
    assert preset.backends == ("litert-int8", "litert-fp32") and preset.stream_scenarios == ()
    assert preset.tf_runs == () and preset.profile_caches == ()
    by_role = {s.role: s for s in preset.scenarios}
    assert set(by_role) == {"single", "batch"}
    full = {s.role: s for s in config.make_preset("full").scenarios}
    for role, clients in (("single", 1), ("batch", 8)):
        s = by_role[role]
        # GPT-2's short scenarios: the same prompts, greedy, 64 new tokens; whole rounds of them.
        assert (s.clients, s.prompts, s.max_tokens, s.temperature) == (clients, full[role].prompts, 64, 0.0)
        assert s.requests % len(s.prompts) == 0
    runs = {r.name: r for r in preset.torch_runs}
    assert set(runs) == {"short_b1", "mixed_b8"}
    assert (runs["short_b1"].batch_size, set(runs["short_b1"].prompts)) == (1, {config.SHORT_PROMPT})
    assert (runs["mixed_b8"].batch_size, set(runs["mixed_b8"].prompts)) == (8, set(config.MIXED_PROMPTS))
    assert all(r.max_new_tokens == 64 for r in preset.torch_runs)
    # int8 is forced (random weights fail the quality gate), fp32 asked for.
    assert config.BACKENDS["litert-int8"].env["LITERT_PRECISION"] == "int8"
    assert config.BACKENDS["litert-fp32"].env["LITERT_PRECISION"] == "fp32"
    assert preset.scenarios_for(config.BACKENDS["litert-fp32"]) == preset.scenarios
    qwen = config.make_preset("llama", "qwen2.5-0.5b")
    assert qwen.model_shape == "qwen2.5-0.5b" and qwen.scenarios == preset.scenarios
    # Any preset on a Llama-family shape drops tf, which serves GPT-2's TensorFlow weights alone.
    assert config.make_preset("full", "smollm2-135m").backends == ("litert-int8", "litert-fp32")
    assert config.make_preset("tiny").backends == config.DEFAULT_BACKENDS
    assert config.default_preset("qwen2.5-0.5b") == "llama"
    assert config.default_preset("distilgpt2") == config.default_preset(None) == "full"
    with pytest.raises(ValueError, match="unknown model shape"):
        config.make_preset("llama", "llama-3-8b")


def test_model_shape_option_picks_the_preset_and_its_backends():
    from bench import cli

    def resolve(*argv):
        return cli.resolve(cli.build_parser().parse_args(list(argv)))

    preset, backends = resolve("--model-shape", "qwen2.5-0.5b")
    assert (preset.name, preset.model_shape) == ("llama", "qwen2.5-0.5b")
    assert [b.name for b in backends] == ["litert-int8", "litert-fp32"]
    preset, backends = resolve("--preset", "llama")
    assert preset.model_shape == "smollm2-135m" and preset.health_timeout == 600
    preset, backends = resolve("--preset", "llama", "--model-shape", "smollm2-135m", "--backends", "litert-int8")
    assert [b.name for b in backends] == ["litert-int8"]
    preset, backends = resolve()
    assert (preset.name, preset.model_shape, [b.name for b in backends]) == (
        "full", "distilgpt2", list(config.DEFAULT_BACKENDS))
    assert resolve("--preset", "tiny")[0].health_timeout == 300
    with pytest.raises(SystemExit, match="tf backend"):
        resolve("--model-shape", "smollm2-135m", "--backends", "tf,litert-int8")
    with pytest.raises(SystemExit):
        resolve("--model-shape", "llama-3-8b")  # argparse: not one of the choices


def test_model_shapes_are_the_real_models_configs():
    from bench import make_model

    assert set(make_model.SHAPES) == {k for k, v in config.MODEL_SHAPES.items() if v == "llama"}
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from make_test_model import SHAPES as GPT2_SHAPES
    finally:
        sys.path.pop(0)
    assert set(GPT2_SHAPES) == {k for k, v in config.MODEL_SHAPES.items() if v == "gpt2"}
    smol, qwen = (make_model.SHAPES[k]["config"] for k in ("smollm2-135m", "qwen2.5-0.5b"))
    dims = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size", "tie_word_embeddings", "rope_theta", "max_position_embeddings", "rms_norm_eps")
    assert [smol[k] for k in dims] == [576, 30, 9, 3, 1536, 49152, True, 100000, 8192, 1e-5]
    assert [qwen[k] for k in dims] == [896, 24, 14, 2, 4864, 151936, True, 1000000.0, 32768, 1e-6]
    assert smol["architectures"] == ["LlamaForCausalLM"] and qwen["architectures"] == ["Qwen2ForCausalLM"]
    assert smol["torch_dtype"] == qwen["torch_dtype"] == "bfloat16"
    for name, shape in make_model.SHAPES.items():
        ids = {t: i for i, t in shape["specials"].items()}
        assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= set(ids), name
        eos = shape["generation_config"]["eos_token_id"]
        assert ids["<|im_end|>"] == shape["config"]["eos_token_id"] == (eos[0] if isinstance(eos, list) else eos)
        assert max(ids.values()) < shape["config"]["vocab_size"]
        assert "<|im_start|>" in shape["tokenizer_config"]["chat_template"]
    assert make_model.SHAPES["qwen2.5-0.5b"]["specials"][151643] == "<|endoftext|>"


def test_llama_tokenizer_has_exactly_the_vocabulary_with_specials_at_their_ids():
    """Qwen2.5's layout (the special tokens after the regular ones, then more ids) at a small size."""
    from bench import make_model

    specials = {1000: "<|endoftext|>", 1001: "<|im_start|>", 1002: "<|im_end|>", 1003: "<tool_call>"}
    tok, trained = make_model.build_tokenizer(1200, specials, ("<tool_call>",), corpus_bytes=200_000)
    assert tok.get_vocab_size(with_added_tokens=True) == 1200 and trained == 1200 - 4
    assert {i: tok.id_to_token(i) for i in specials} == specials
    # 2000 ids from a corpus that supports fewer: the rest are filled, and never produced.
    tok, trained = make_model.build_tokenizer(2000, specials, corpus_bytes=20_000)
    assert tok.get_vocab_size(with_added_tokens=True) == 2000 and trained < 2000 - 4
    assert tok.id_to_token(1999) == f"<unused_{1999 - 4 - trained}>"
    enc = tok.encode("<|im_start|>user\nprint('<unused_0>')<|im_end|>")
    assert enc.ids[0] == 1001 and enc.ids[-1] == 1002 and max(enc.ids[1:-1]) < trained
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>user\nprint('<unused_0>')<|im_end|>"


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


def test_histogram_window_reads_quantiles_like_prometheus():
    def text(b1, b2, inf, total):
        return (f'llm_time_to_first_token_seconds_bucket{{le="0.1"}} {b1}\n'
                f'llm_time_to_first_token_seconds_bucket{{le="0.5"}} {b2}\n'
                f'llm_time_to_first_token_seconds_bucket{{le="+Inf"}} {inf}\n'
                f"llm_time_to_first_token_seconds_sum {total}\nllm_time_to_first_token_seconds_count {inf}\n")

    before, after = text(1, 2, 2, 0.3), text(5, 10, 12, 3.3)
    assert parse_histogram(after, "llm_time_to_first_token_seconds") == {0.1: 5, 0.5: 10, float("inf"): 12}
    # The window holds 4 observations up to 0.1 s, 4 more up to 0.5 s and 2 above.
    window = histogram_window(before, after, "llm_time_to_first_token_seconds")
    assert window["count"] == 10 and window["mean_s"] == pytest.approx(0.3)
    assert window["p50_s"] == pytest.approx(0.2)  # rank 5: a quarter into (0.1, 0.5]
    assert window["p95_s"] == 0.5  # in +Inf: the largest finite bound
    assert histogram_quantile({}, 0.5) is None
    assert histogram_window(before, "", "llm_time_to_first_token_seconds")["count"] is None


class FakeStreamingServer:
    """POST /generate as the streaming contract says, one token every `step` seconds per request.

    Requests do not slow each other down, so head-of-line ratios come out near 1.
    """

    def __init__(self, step: float = 0.002, stream_ok: bool = True, busy_first: int = 0):
        self.step, self.stream_ok, self.busy_left = step, stream_ok, busy_first
        self.bodies: list[dict] = []

    async def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.busy_left:
            self.busy_left -= 1
            return httpx.Response(503, headers={"retry-after": "0"}, json={"detail": "busy"})
        n = body["max_tokens"]
        if not body.get("stream"):
            await asyncio.sleep(self.step * n)
            return httpx.Response(200, json={"results": ["x" * n]})
        if not self.stream_ok:
            return httpx.Response(422, json={"detail": "stream: extra fields not permitted"})

        async def events():
            for _ in range(n):
                await asyncio.sleep(self.step)
                yield b'data: {"index": 0, "text": " x"}\n\n'
            yield (b'data: {"index": 0, "text": "", "finish_reason": "length", "prompt_tokens": 3, '
                   b'"generated_tokens": %d}\n\n' % n)
            yield b"data: [DONE]\n\n"

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events())

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)


def _stream_once(server: FakeStreamingServer, body: dict) -> stream.StreamOutcome:
    async def go():
        async with httpx.AsyncClient(base_url="http://fake", transport=server.transport) as client:
            return await stream.stream_request(client, body)
    return asyncio.run(go())


def test_stream_request_reads_pieces_then_the_final_event():
    server = FakeStreamingServer(busy_first=1)
    o = _stream_once(server, {"prompts": ["hi"], "max_tokens": 5, "temperature": 0.0})
    assert o.error is None and o.text == " x" * 5 and o.pieces == 5
    assert (o.finish_reason, o.prompt_tokens, o.generated_tokens, o.rejected_503) == ("length", 3, 5, 1)
    assert 0 < o.first_piece <= o.final_event <= o.latency
    assert o.per_token == pytest.approx((o.final_event - o.first_piece) / 4)
    assert all(b["stream"] is True for b in server.bodies)


def test_stream_request_names_what_is_wrong():
    o = _stream_once(FakeStreamingServer(stream_ok=False), {"prompts": ["hi"], "max_tokens": 2, "temperature": 0})
    assert o.latency is None and o.error.startswith("HTTP 422")

    def answer(body: bytes, kind="text/event-stream"):
        server = FakeStreamingServer()

        async def handler(request):
            return httpx.Response(200, headers={"content-type": kind}, content=body)
        server.handler = handler
        return _stream_once(server, {"prompts": ["hi"], "max_tokens": 2, "temperature": 0})

    assert answer(b'{"results": ["ab"]}', "application/json").error.startswith("not a stream")
    assert answer(b'data: {"index": 0, "text": "a"}\n\ndata: [DONE]\n\n').error == \
        "bad stream: [DONE] before the final event"
    assert answer(b'data: {"index": 0, "text": "a"}\n\n').error == "the stream ended without [DONE]"
    assert answer(b"data: {not json\n\n").error.startswith("bad stream")


def test_head_of_line_times_the_short_request_idle_then_beside_the_streams():
    sc = config.HeadOfLine("hol", 3, ("a", "b"), 60, "short", 4, 2, 2)
    server = FakeStreamingServer()
    r = asyncio.run(stream.head_of_line("http://fake", sc, transport=server.transport))
    assert r["errors"] == 0 and r["requests"] == 2 + sum(x["short_requests"] for x in r["rounds"]) + 2 * 3
    assert len(r["idle_latencies_s"]) == 2 and len(r["rounds"]) == 2
    # Short requests went out one after another while the long ones streamed.
    assert r["loaded_rounds"] == 2 and all(x["loaded_requests"] >= 1 for x in r["rounds"])
    assert r["loaded_requests"] == sum(len(x["short_latencies_s"]) for x in r["rounds"])
    assert all(x["long_tokens"] == 3 * 60 for x in r["rounds"])
    assert r["ratio"] == pytest.approx(r["loaded_latency_p50_s"] / r["idle_latency_p50_s"])
    short = [b for b in server.bodies if b["prompts"] == ["short"]]
    assert len(short) == 2 + sum(x["short_requests"] for x in r["rounds"]) and not any(b.get("stream") for b in short)
    assert sorted(b["prompts"][0] for b in server.bodies if b.get("stream")) == ["a", "a", "a", "a", "b", "b"]


def test_uneven_load_and_lockstep_send_the_same_requests():
    sc = config.UnevenLoad("uneven", 3, 2, ("p", "q"), (2, 9), 0.02, 8)
    workload = sc.workload()
    assert workload == sc.workload()  # fixed seed
    assert [[b["prompts"][0] for _, b in row] for row in workload] == [["p", "q", "p"], ["q", "p", "q"]]
    assert all(2 <= b["max_tokens"] <= 9 and 0 <= t <= 0.02 and b["temperature"] == 0 for row in workload
               for t, b in row)
    results = {}
    for lockstep in (True, False):
        server = FakeStreamingServer()
        results[lockstep] = asyncio.run(stream.uneven_load("http://fake", sc, lockstep, transport=server.transport))
        assert sorted((b["prompts"][0], b["max_tokens"]) for b in server.bodies) == sorted(
            (b["prompts"][0], b["max_tokens"]) for row in workload for _, b in row)
    lock, uneven = results[True], results[False]
    total = sum(b["max_tokens"] for row in workload for _, b in row)
    assert lock["new_tokens"] == uneven["new_tokens"] == lock["max_tokens_total"] == total
    assert lock["think_seconds_total"] == 0 and uneven["think_seconds_total"] > 0
    assert lock["errors"] == uneven["errors"] == 0 and lock["ok"] == uneven["ok"] == 6
    assert 0 < uneven["ttft_p50_s"] <= uneven["ttft_p95_s"] and uneven["tok_per_s"] > 0


def test_stream_overhead_interleaves_and_bounds_the_first_piece():
    sc = config.StreamOverhead("overhead", "hello", 20, 2)
    server = FakeStreamingServer()
    r = asyncio.run(stream.stream_overhead("http://fake", sc, transport=server.transport))
    assert r["errors"] == 0 and r["requests"] == 6
    sent = [(b.get("stream", False), b["max_tokens"]) for b in server.bodies]
    assert sent == [(False, 20), (True, 20), (False, 1)] * 2
    assert r["streamed_tokens"] == [20, 20] and r["streamed_pieces"] == [20, 20]
    assert r["first_piece_bound_s"] == pytest.approx(r["one_token_p50_s"] + 2 * r["per_token_p50_s"])
    assert r["ratio"] == pytest.approx(r["streamed_p50_s"] / r["unstreamed_p50_s"])


def test_ttft_and_tpot_from_an_event_timeline():
    """TTFT is the first piece with text; TPOT spreads the rest of the latency over the tokens
    after the first, counted by the final event (a piece may hold several tokens' text)."""
    o = StreamOutcome(prompt="p", max_tokens=8)
    timeline = [(0.120, '{"index": 0, "text": " a"}'), (0.170, '{"index": 0, "text": " b c"}'),
                (0.220, '{"index": 0, "text": " d"}'),
                (0.221, '{"index": 0, "text": "", "finish_reason": "length", "prompt_tokens": 3, '
                        '"generated_tokens": 5}'),
                (0.222, "[DONE]")]
    done = [parse_event(f"data: {payload}", o, t) for t, payload in timeline]
    assert done == [False] * 4 + [True]
    assert o.ttft is None  # not before [DONE]: an incomplete stream has no figures
    o.latency = 0.222  # set by stream_request at [DONE]
    assert (o.text, o.pieces, o.generated_tokens) == (" a b c d", 3, 5)
    assert o.ttft == 0.120 and o.tpot == pytest.approx((0.222 - 0.120) / 4)
    assert time_per_output_token(0.1, 0.1, 1) is None and time_per_output_token(None, 1.0, 5) is None
    assert time_per_output_token(0.1, 0.5, 2) == pytest.approx(0.4)
    # A final event without the server's count is not guessed from max_tokens.
    with pytest.raises(ValueError, match="generated_tokens"):
        parse_event('data: {"index": 0, "text": "", "finish_reason": "length"}', StreamOutcome("p", 8), 0.1)


def test_load_clients_stream_and_report_ttft_and_tpot():
    server = FakeStreamingServer(step=0.003, busy_first=2)
    bodies = [{"prompts": [f"p{i}"], "max_tokens": n, "temperature": 0.0} for i, n in enumerate((6, 1, 4, 6))]
    load = run_load("http://fake", 2, bodies, transport=server.transport)
    assert all(b["stream"] is True for b in server.bodies) and len(server.bodies) == 4 + 2
    assert [o.prompt for o in load.outcomes] == ["p0", "p1", "p2", "p3"]
    assert [o.generated_tokens for o in load.outcomes] == [6, 1, 4, 6]
    assert [o.text for o in load.outcomes] == [" x" * 6, " x", " x" * 4, " x" * 6]
    assert sum(o.rejected_503 for o in load.outcomes) == 2
    for o in load.outcomes:
        assert o.error is None and 0 < o.ttft <= o.latency
    assert load.outcomes[1].tpot is None  # one token: no pace after the first
    assert load.outcomes[0].tpot == pytest.approx((load.outcomes[0].latency - load.outcomes[0].ttft) / 5)
    scenario = config.Scenario("greedy_c2", "batch", 2, 4, ("p",), 6)
    s = report.scenario_result(scenario, load, {"llm_generated_tokens_total": 10},
                               {"llm_generated_tokens_total": 27}, {"vmhwm_mib": 1.0, "vmrss_mib": 1.0})
    assert (s["new_tokens"], s["new_tokens_streamed"], s["tpot_requests"], s["ok"]) == (17, 17, 3, 4)
    assert s["ttft_p50_s"] == pytest.approx(percentile([o.ttft for o in load.outcomes], 50))
    assert 0 < s["tpot_p50_s"] <= s["tpot_p95_s"] and 0 < s["ttft_p50_s"] <= s["ttft_p95_s"]


def _plot_result() -> dict:
    """A small result of result.json's shape: two backends, both baselines."""
    def scenario(name, role, clients, tok_per_s, ttft, tpot):
        return {"name": name, "role": role, "clients": clients, "tok_per_s": tok_per_s, "ttft_p50_s": ttft,
                "ttft_p95_s": ttft * 2, "tpot_p50_s": tpot, "tpot_p95_s": tpot * 1.5}

    int8 = {s["name"]: s for s in (scenario("greedy_c1", "single", 1, 120.0, 0.01, 0.008),
                                   scenario("greedy_c8", "batch", 8, 400.0, 0.05, 0.02),
                                   scenario("sampled_c8", "batch_sampled", 8, 380.0, 0.06, 0.021),
                                   scenario("greedy_c32", "overload", 32, 420.0, 1.5, 0.06))}
    tf = {s["name"]: s for s in (scenario("greedy_c1", "single", 1, 60.0, 0.02, 0.016),
                                 scenario("greedy_c8", "batch", 8, 150.0, 0.1, 0.05))}
    baselines = {"pt:short_b1": {"batch_size": 1, "tok_per_s": 40.0}, "pt:mixed_b8": {"batch_size": 8, "tok_per_s": 150.0},
                 "pt:mixed_b1": {"batch_size": 1, "tok_per_s": 35.0}, "tf:short_b1": {"batch_size": 1, "tok_per_s": 3.5}}
    return {"preset": "full", "started_at": "2026-01-01 00:00:00", "max_tokens": 64,
            "machine": {"cpu_model": "Test CPU", "cores": 2},
            "model": {"shape": "distilgpt2", "summary": "6 layers, 768 wide, 50257 vocab"},
            "phases": {"litert-int8": {"scenarios": int8}, "tf": {"scenarios": tf}}, "baselines": baselines}


def _svg_texts(path: Path) -> list[str]:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]


def test_throughput_plot_has_a_line_per_backend_and_baseline(tmp_path):
    result = _plot_result()
    fig = plots.throughput_figure(result)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["service, litert-int8", "service, tf", "PyTorch generate (x = batch size)",
                      "naive TF eager generate (batch 1)"]
    lines = {line.get_label(): list(zip(*line.get_data())) for line in ax.get_lines()}
    assert lines["service, litert-int8"] == [(1, 120.0), (8, 400.0), (32, 420.0)]  # not sampled_c8
    assert lines["PyTorch generate (x = batch size)"] == [(1, 40.0), (8, 150.0)]  # short_b1, not mixed_b1
    assert lines["naive TF eager generate (batch 1)"] == [(1, 3.5)]
    assert ax.get_yscale() == "log" and ax.get_xscale() == "log"  # 3.5 to 420 tok/s
    assert "Test CPU, 2 cores" in ax.get_title() and "distilgpt2" in ax.get_title()
    assert "tokens/s" in ax.get_ylabel() and "clients" in ax.get_xlabel()
    names = plots.write_run_plots(result, tmp_path)
    assert names == ["throughput.svg", "latency.svg"]
    texts = _svg_texts(tmp_path / "throughput.svg")
    assert set(labels) <= set(texts)
    # Without the slow naive baseline the range is narrow enough for a linear axis.
    del result["baselines"]["tf:short_b1"]
    assert plots.throughput_figure(result).axes[0].get_yscale() == "linear"


def test_latency_plot_shows_ttft_and_tpot_per_scenario_and_backend(tmp_path):
    fig = plots.latency_figure(_plot_result())
    ttft, tpot = fig.axes
    assert [t.get_text() for t in ttft.get_yticklabels()] == ["greedy_c1", "greedy_c8", "sampled_c8", "greedy_c32"]
    assert "first token" in ttft.get_xlabel() and "per output token" in tpot.get_xlabel()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:2] == ["litert-int8", "tf"] and "median" in labels
    # Per panel: a median dot, a whisker and a p95 tick per (backend, scenario) measured: 4 + 2.
    medians = [line for line in ttft.get_lines() if line.get_marker() == "o"]
    assert len(medians) == 6
    int8_c32 = [line for line in medians if line.get_color() == "tab:blue" and line.get_ydata()[0] > 2.5]
    assert int8_c32[0].get_xdata()[0] == pytest.approx(1500.0)  # ms
    assert ttft.get_xscale() == "log"  # 10 ms to 3 s
    plots.write_run_plots(_plot_result(), tmp_path, "png")
    for name in ("throughput.png", "latency.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A result from before the streamed clients: panels say so instead of staying blank.
    old = _plot_result()
    for phase in old["phases"].values():
        for s in phase["scenarios"].values():
            for key in ("ttft_p50_s", "ttft_p95_s", "tpot_p50_s", "tpot_p95_s"):
                del s[key]
    assert "no TTFT in this result" in [t.get_text() for t in plots.latency_figure(old).axes[0].texts]


def test_soak_plot_marks_the_counted_window(tmp_path):
    result = {"kind": "soak", "backend": "litert-int8", "clients": 4, "minutes": 2, "max_tokens": 8,
              "machine": {"cpu_model": "Test CPU", "cores": 2}, "started_at": "now",
              "samples": {"rss_mib": [[-30.0, 300.0], [0.0, 400.0], [60.0, 410.0], [120.0, 408.0]]},
              "summary": {"rss_start_mib": 400.0, "rss_end_mib": 408.0, "rss_drift_percent": 2.0}}
    fig = plots.soak_rss_figure(result)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["counted window (2 min)", "VmRSS of the service", "counted start: 400.0 MiB",
                      "counted end: 408.0 MiB"]
    rss = next(line for line in ax.get_lines() if line.get_label() == "VmRSS of the service")
    assert list(rss.get_xdata()) == [-0.5, 0.0, 1.0, 2.0] and list(rss.get_ydata()) == [300.0, 400.0, 410.0, 408.0]
    assert "MiB" in ax.get_ylabel() and "min" in ax.get_xlabel() and "+2.00%" in ax.get_title()
    # Drawn again from the saved JSON, as `python -m bench.plots DIR` does.
    (tmp_path / "result.json").write_text(json.dumps(result))
    assert plots.main([str(tmp_path)]) == 0
    assert "counted window (2 min)" in _svg_texts(tmp_path / "soak-rss.svg")


def test_report_links_the_plots_and_save_copies_them(tmp_path):
    work, latest = tmp_path / "run", tmp_path
    work.mkdir()
    result = _plot_result()
    result["plots"] = plots.write_run_plots(result, work)
    assert report.plot_links(result) == [
        "", f"![{report.PLOT_CAPTIONS['throughput']}](throughput.svg)",
        "", f"![{report.PLOT_CAPTIONS['latency']}](latency.svg)"]
    report.save(result, "md", work, latest, "latest")
    assert json.loads((latest / "latest.json").read_text())["plots"] == ["throughput.svg", "latency.svg"]
    assert (latest / "throughput.svg").read_bytes() == (work / "throughput.svg").read_bytes()


def _streams(**over) -> dict:
    hol = {"name": "head_of_line", "role": "head_of_line", "short_max_tokens": 16, "long_clients": 4,
           "long_max_tokens": 512, "ratio": 2.0, "idle_latency_p50_s": 0.1, "loaded_latency_p50_s": 0.2,
           "rounds": [{}] * 3, "loaded_rounds": 3, "loaded_requests": 30, "errors": 0, "cpu": {"other_cores": 0.0}}
    half = {"tok_per_s": 100.0, "ttft_p95_s": 0.2, "errors": 0, "cpu": {"other_cores": 0.0},
            "server": {"ttft": {"p95_s": 0.25}}}
    uneven = {"name": "uneven_c8", "role": "uneven_load", "clients": 8, "max_tokens_range": [16, 256],
              "think_max_s": 0.5, "uneven": {**half, "tok_per_s": 90.0}, "lockstep": half}
    over_ = {"name": "stream_overhead", "role": "stream_overhead", "max_tokens": 128, "repetitions": 5,
             "ratio": 1.01, "streamed_p50_s": 0.404, "unstreamed_p50_s": 0.4, "first_piece_p50_s": 0.012,
             "one_token_p50_s": 0.01, "per_token_p50_s": 0.003, "first_piece_bound_s": 0.016, "errors": 0,
             "cpu": {"other_cores": 0.0}}
    parts = {"head_of_line": hol, "uneven_c8": uneven, "stream_overhead": over_}
    for key, value in over.items():
        name, field = key.split("__")
        parts[name] = {**parts[name], field: value}
    return parts


def test_stream_bars_hold_fail_or_read_na():
    shared = lambda *parts: any(p.get("cpu", {}).get("other_cores", 0) > 0.25 for p in parts)  # noqa: E731
    bars = {b.id: b for b in report.stream_bars(_streams(), shared)}
    assert {k: b.holds for k, b in bars.items()} == {
        "head_of_line": True, "uneven_vs_lockstep": True, "stream_overhead": True, "stream_first_piece": True}
    assert bars["uneven_vs_lockstep"].measured.startswith("0.90× (90.0 vs 100.0 tok/s); TTFT p95 0.200 s")
    assert bars["stream_first_piece"].measured == "12.0 ms vs 10.0 + 2 × 3.00 = 16.0 ms"
    bars = {b.id: b for b in report.stream_bars(_streams(head_of_line__ratio=3.5, stream_overhead__errors=1,
                                                         head_of_line__cpu={"other_cores": 1.0}), shared)}
    assert bars["head_of_line"].holds is False and bars["head_of_line"].shared
    assert bars["stream_overhead"].holds is False and bars["stream_first_piece"].holds is False
    # A short request answered after a long one finished was not measured under load.
    bars = {b.id: b for b in report.stream_bars(_streams(head_of_line__loaded_requests=0), shared)}
    assert bars["head_of_line"].holds is None
    assert all(b.holds is None for b in report.stream_bars({}, shared))
    parts = [name for name, _ in report.stream_measurements(_streams())]
    assert parts == ["head_of_line", "uneven_c8 (uneven)", "uneven_c8 (lockstep)", "stream_overhead"]


def _llama_result(shape: str, int8=(120.0, 300.0), fp32=(40.0, 90.0), torch=(30.0, 110.0)) -> dict:
    """A llama-preset result of result.json's shape (tok/s at 1 and 8 clients per backend)."""
    def scenarios(c1, c8):
        return {name: {"name": name, "role": role, "clients": clients, "requests": 8, "ok": 8, "max_tokens": 64,
                       "temperature": 0.0, "tok_per_s": tps, "new_tokens": 512, "req_per_s": 1.0, "latency_p50_s": 1.0,
                       "latency_p95_s": 1.0, "responses_503": 0, "errors": 0, "vmhwm_mib": 300.0,
                       "tokens_per_request": 64.0, "cpu": {"own_cores": 2.0, "other_cores": 0.0}}
                for name, role, clients, tps in (("greedy_c1", "single", 1, c1), ("greedy_c8", "batch", 8, c8))}

    baselines = {f"pt:{name}": {"name": name, "framework": "pt", "batch_size": b, "requests": 8, "max_new_tokens": 64,
                                "new_tokens": 512, "tokens_per_request": 64.0, "tok_per_s": tps, "req_per_s": 1.0,
                                "latency_p50_s": 1.0, "eos_stops": 0, "cpu": {"own_cores": 2.0, "other_cores": 0.0}}
                 for name, b, tps in (("short_b1", 1, torch[0]), ("mixed_b8", 8, torch[1]))}
    phases = {}
    for name, tps in (("litert-int8", int8), ("litert-fp32", fp32)):
        service = {"compiles_after_warmup": 0, "vmhwm_since_start_mib": 350.0, "warmup_seconds": 3.0}
        sc = scenarios(*tps)
        bars, ratios = report.compute_bars(name, sc, baselines, service, {}, "llama", shape)
        phases[name] = {"title": name, "scenarios": sc, "service": service, "stream_scenarios": {},
                        "bars": report.bars_as_dicts(bars), "ratios": ratios, "exact_text": name == "litert-fp32",
                        "checks": report.consistency_checks(sc, baselines, {})}
    return {"preset": "llama", "started_at": "now", "machine": {"cpu_model": "Test CPU", "cores": 2, "cores_usable": 2,
            "memory_gib": 8, "kernel": "6", "machine": "x86_64"}, "load_before": [0.1], "load_after": [0.1],
            "model": {"shape": shape, "summary": "LlamaForCausalLM: 30 layers", "dir": "m",
                      "weights": "model.safetensors, bfloat16"},
            "max_tokens": 64, "long_max_tokens": 64, "temperature": 0.8, "phases": phases, "baselines": baselines,
            "torch": {"torch": "2.13.0+cpu", "threads": 2, "peak_rss_mib": 1100.0,
                      "logits_check": {"reference": "the model's as saved", "max_abs_diff": 0.0, "same_argmax": True}}}


def test_llama_bars_state_smollm2s_targets_and_whether_they_hold():
    result = _llama_result("smollm2-135m", int8=(120.0, 200.0))  # 4.0x PyTorch b1, 1.82x PyTorch b8
    bars = {b["id"]: b for b in result["phases"]["litert-int8"]["bars"]}
    assert set(bars) == {"single_vs_torch_b1", "batch_vs_torch_b8", "compiles_after_warmup"}
    assert (bars["single_vs_torch_b1"]["measured"], bars["single_vs_torch_b1"]["target"]) == ("4.00×", "≥ 3.0×")
    assert bars["single_vs_torch_b1"]["holds"] is True
    assert (bars["batch_vs_torch_b8"]["measured"], bars["batch_vs_torch_b8"]["holds"]) == ("1.82×", False)
    assert bars["compiles_after_warmup"]["holds"] is True
    assert result["phases"]["litert-fp32"]["bars"] == []
    # The mixed prompts' token counts are checked against PyTorch batch 8 (no batch-1 run of them).
    counts = result["phases"]["litert-int8"]["checks"]["token_counts"]
    assert [(c["scenario"], c["baseline"]) for c in counts] == [("greedy_c1", "pt:short_b1"), ("greedy_c8", "pt:mixed_b8")]
    md = report.markdown(result)
    assert "| litert-int8 | smollm2-135m: greedy_c1 (the short prompt): tok/s vs PyTorch generate, batch 1 | 4.00× | " \
           "≥ 3.0× | yes |" in md
    assert "| 1.82× | ≥ 2.0× | **no** |" in md
    assert "| service, litert-int8 | 120.0 | 200.0 | 4.00× | 1.82× | 350 (server, since start) |" in md
    assert "| service, litert-fp32 | 40.0 | 90.0 | 1.33× | 0.82× |" in md
    assert "| PyTorch generate (fp32) | 30.0 (batch 1) | 110.0 (batch 8) | – | – | 1100 (worker) |" in md
    assert "model.safetensors, bfloat16" in md and "recorded for the model it saved" in md
    assert "naive TF" not in md
    # Qwen2.5's shape has no bars of its own: the same ratios against none (n/a).
    qwen = {b["id"]: b for b in _llama_result("qwen2.5-0.5b")["phases"]["litert-int8"]["bars"]}
    assert qwen["single_vs_torch_b1"]["holds"] is None and qwen["single_vs_torch_b1"]["measured"] == "4.00×"
    assert qwen["single_vs_torch_b1"]["target"] == "none for qwen2.5-0.5b (smollm2-135m: ≥ 3.0×)"
    # bench.report RESULT.json recomputes them with the preset and shape the result names.
    again = report.rerender(json.loads(json.dumps(result)))
    assert again["phases"]["litert-int8"]["bars"] == result["phases"]["litert-int8"]["bars"]


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
    result["_results_dir"] = out / "results"
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
            # The clients streamed: each request's TTFT, and its token count from the final
            # event, which adds up to the server's own count.
            assert s["new_tokens_streamed"] == s["new_tokens"]
            assert 0 < s["ttft_p50_s"] <= s["ttft_p95_s"] <= s["latency_max_s"]
            assert 0 < s["tpot_requests"] <= s["ok"] and 0 <= s["tpot_p50_s"] <= s["tpot_p95_s"]
    # Issue 8's scenarios ran on int8 alone, every request answered and streamed in full.
    for name, phase in tiny_result["phases"].items():
        streams = phase["stream_scenarios"]
        assert set(streams) == {s.name for s in preset.stream_scenarios_for(config.BACKENDS[name])}
    streams = tiny_result["phases"]["litert-int8"]["stream_scenarios"]
    hol, uneven, overhead = (streams[s.name] for s in preset.stream_scenarios)
    for part in (hol, uneven["uneven"], uneven["lockstep"], overhead):
        assert part["errors"] == 0, part["error_samples"]
        assert part["cpu"]["own_cores"] is not None and part["server"]["ttft"]["count"] > 0
    assert hol["loaded_requests"] > 0, hol["rounds"]  # a short request met all the long streams running
    assert hol["ratio"] > 0 and len(hol["rounds"]) == preset.stream_scenarios[0].repetitions
    assert uneven["uneven"]["new_tokens"] == uneven["lockstep"]["new_tokens"] > 0
    assert uneven["uneven"]["new_tokens"] == uneven["uneven"]["new_tokens_server"]
    assert 0 < uneven["uneven"]["ttft_p50_s"] <= uneven["uneven"]["ttft_p95_s"]
    assert overhead["ratio"] > 0 and overhead["first_piece_bound_s"] > 0
    assert overhead["streamed_tokens"] == [preset.stream_scenarios[2].max_tokens] * overhead["repetitions"]
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
        "compiles_after_warmup", "head_of_line", "uneven_vs_lockstep", "stream_overhead", "stream_first_piece",
        "filtering_cost_batch", "nucleus_cost_batch", "window_peak_rss"}
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
    assert "| TTFT p50 / p95 ms | TPOT p50 / p95 ms |" in md
    # The plots beside latest.md, linked from it.
    assert tiny_result["plots"] == ["throughput.svg", "latency.svg"]
    for name in tiny_result["plots"]:
        assert f"]({name})" in md and (tiny_result["_results_dir"] / name).read_text().startswith("<?xml")
    for phase in tiny_result["phases"].values():
        for name in phase["scenarios"]:
            assert name in md
        for name, _ in report.stream_measurements(phase["stream_scenarios"]):
            assert f"| {name} |" in md


def test_tiny_run_profiles_the_int8_decode_step(tiny_result):
    profile = tiny_result["profile"]
    assert profile and "error" not in profile, profile
    assert profile["step_ms"] > 0 and profile["op_sum_ms"] > 0
    assert any(k.startswith("FULLY_CONNECTED") for k in profile["by_type"])
    assert "CUSTOM:KVAttention" in profile["by_type"]
    assert "Per-op profile" in tiny_result["_markdown"]
    assert [p.get("cache") for p in tiny_result["profiles"]] == [256, 640]


def test_soak_summary_takes_rss_at_the_counted_start_and_end_and_counts_per_minute():
    from bench.soak import SoakLog, markdown, summarize

    soak = SoakLog(
        rss=[(-30.0, 300.0), (0.0, 400.0), (60.0, 410.0), (119.0, 430.0), (121.0, 408.0)],
        tokens=[(-30.0, 0.0), (0.0, 1000.0), (60.0, 7000.0), (121.0, 13100.0)],
        completed=[-5.0] + [i * 0.5 for i in range(240)],  # 120 a minute in each counted minute
        errors=[(-10.0, "HTTP 500: warm-up"), (90.0, "ReadTimeout: slow")],
        rejected_503=3,
    )
    s = summarize(soak, minutes=2)
    assert (s["rss_start_mib"], s["rss_end_mib"], s["rss_max_mib"]) == (400.0, 408.0, 430.0)
    assert s["rss_drift_percent"] == pytest.approx(2.0)
    assert (s["requests"], s["errors"], s["errors_in_warmup"], s["first_errors"]) == (
        240, 1, 1, ["ReadTimeout: slow"])
    # Tokens: the counter interpolated at the minutes' edges (121 s -> 13100, so 120 s -> 13000).
    assert [(m["requests"], m["tokens_per_minute"]) for m in s["per_minute"]] == [(120, 6000.0), (120, 6000.0)]
    assert [(b["name"], b["holds"]) for b in s["bars"]] == [("RSS drift", True), ("errors", False)]
    result = {"summary": s, "clients": 32, "minutes": 2, "backend": "litert-int8", "started_at": "now",
              "model_dir": "m", "max_tokens": 64, "temperature": 0.8, "warmup_minutes": 0.5,
              "revision": {"commit": "abc"}, "load_before": [1.0]}
    md = markdown(result)
    assert "| RSS drift | +2.00% | < 5% | yes |" in md and "| errors | 1 | 0 | no |" in md
    assert "| 2 | 120 | 120.0 | 6000 |" in md and "- `ReadTimeout: slow`" in md
    # More than 5% of growth is a miss; a partial last minute is scaled to a rate.
    grown = summarize(SoakLog(rss=[(0.0, 100.0), (150.0, 106.0)], completed=[10.0, 70.0, 130.0, 140.0]),
                      minutes=2.5)
    assert grown["bars"][0]["holds"] is False
    assert [m["requests_per_minute"] for m in grown["per_minute"]] == [1.0, 1.0, 4.0]


def test_profile_step_mask_gives_each_row_its_own_slots():
    from bench.profile_step import MASKED, decode_inputs

    types = {"embeds": (np.dtype(np.float32), [1, 1, 8]), "mask": (np.dtype(np.float32), [1, 1, 1]),
             "key_0": (np.dtype(np.float16), [2, 1, 4])}
    inputs = decode_inputs(types, batch=3, cache=5, model_dir=Path("/nonexistent"))
    assert inputs["key_0"].dtype == np.float16 and inputs["key_0"].shape == (2, 15, 4)
    assert np.isfinite(inputs["key_0"]).all()
    mask = inputs["mask"]
    assert mask.shape == (1, 3, 16) and mask.dtype == np.float32
    for b in range(3):
        own = np.zeros(16, bool)
        own[b * 5:(b + 1) * 5] = own[-1] = True
        assert (mask[0, b, own] == 0).all() and (mask[0, b, ~own] == MASKED).all()


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_profile_step_times_every_op_of_the_tiny_model(litert_model_dir, tmp_path, precision):
    """The decode step's attention is the KVAttention custom op: the profile evaluates the step
    op by op (checked against the whole step's `hidden`) and times every op, KVAttention
    through the C API with the kernel registered."""
    from bench import profile_step

    out = tmp_path / "profile.json"
    assert profile_step.main(["--model-dir", str(litert_model_dir), "--precision", precision, "--batch", "4",
                              "--cache", "32", "--repeats", "3", "--flush-mib", "8", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    raw = result["raw"]
    assert [o for o in raw["ops"] if "error" in o] == []
    assert raw["hidden_max_diff"] <= raw["hidden_tolerance"]
    assert result["step_ms"] > 0 and result["op_sum_ms"] > 0
    kv = [o for o in raw["ops"] if o["op"] == "CUSTOM:KVAttention"]
    assert kv and result["by_type"]["CUSTOM:KVAttention"]["count"] == len(kv) == 2  # one per layer
    assert {o["signature"] for o in raw["ops"]} == {"decode", "head"}
    assert any(k.startswith("FULLY_CONNECTED") for k in result["by_type"])
    assert "BATCH_MATMUL" not in result["by_type"]


def test_profile_step_refuses_an_evaluation_that_is_not_the_step():
    from bench.profile_step import check_hidden

    whole = np.array([[1.0, -2.0], [0.5, 4.0]], np.float32)
    assert check_hidden(whole.copy(), whole, 1e-4) == 0.0
    with pytest.raises(RuntimeError, match="does not reproduce the step"):
        check_hidden(whole + np.float32(0.01), whole, 1e-4)
    with pytest.raises(RuntimeError, match="shape"):
        check_hidden(whole[:1], whole, 1e-4)


def test_soak_runs_against_the_tiny_model(litert_model_dir, tmp_path):
    """`python -m bench soak` end to end for a few seconds: it serves, samples and reports."""
    r = subprocess.run([sys.executable, "-m", "bench", "soak", "--model-dir", str(litert_model_dir),
                        "--minutes", "0.1", "--warmup-minutes", "0.02", "--clients", "4", "--max-tokens", "8",
                        "--sample-seconds", "1", "--results-dir", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((tmp_path / "soak-latest.json").read_text())
    s = result["summary"]
    assert result["backend"] == "litert-int8" and result["clients"] == 4
    assert s["errors"] == 0 and s["requests"] > 0 and len(s["per_minute"]) == 1
    assert s["rss_start_mib"] > 0 and s["per_minute"][0]["tokens_per_minute"] > 0
    assert (tmp_path / "soak-latest.md").read_text().startswith("# Soak: 4 clients for 0.1 minutes (litert-int8)")
    assert result["plots"] == ["soak-rss.svg"] and "](soak-rss.svg)" in (tmp_path / "soak-latest.md").read_text()
    assert "VmRSS of the service" in _svg_texts(tmp_path / "soak-rss.svg")
