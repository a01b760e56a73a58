"""llama.cpp's llama-server as the benchmark's peer (bench/llamacpp.py): what can be checked
without the binary. The command lines it builds, the bodies it sends, the stream it reads (from
a fake llama-server), when a run includes it, and how the report sets it beside the service.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest

from bench import cli, config, llamacpp, report
from bench.gguf_convert import is_gpt2_byte_level
from bench.load import run_load

GPT2_CFG = {"model_type": "gpt2", "n_positions": 1024, "n_embd": 768}
SMOLLM2_CFG = {"model_type": "llama", "max_position_embeddings": 8192}


def test_build_commands_are_the_static_cpu_server_build_from_resolved_paths(tmp_path):
    real = tmp_path / "real-cache"
    real.mkdir()
    (tmp_path / "cache").symlink_to(real)
    layout = llamacpp.Layout.of(tmp_path / "cache")
    # ninja reconfigures without end when it reaches the source through a symlink.
    assert layout.root == real.resolve() / "llamacpp"
    assert layout.src == layout.root / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    assert layout.binary == layout.root / "build" / "bin" / "llama-server"
    cmd = llamacpp.configure_command(layout.src, layout.build)
    assert cmd[:7] == ["cmake", "-S", str(layout.src), "-B", str(layout.build), "-G", "Ninja"]
    assert {"-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_SERVER=ON",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"} == set(cmd[7:])
    assert llamacpp.build_command(layout.build, 2) == [
        "cmake", "--build", str(layout.build), "--target", "llama-server", "-j2"]


def test_built_finds_only_an_executable_binary(tmp_path):
    assert llamacpp.built(tmp_path) is None
    binary = llamacpp.Layout.of(tmp_path).binary
    binary.parent.mkdir(parents=True)
    binary.write_text("")
    assert llamacpp.built(tmp_path) is None
    binary.chmod(0o755)
    assert llamacpp.built(tmp_path) == binary


def test_server_command_shares_the_context_among_the_slots():
    settings = llamacpp.ServerSettings(threads=2, parallel=8, slot_context=1024)
    cmd = llamacpp.server_command(Path("/c/llama-server"), Path("/c/m.gguf"), 8123, settings)
    assert cmd[0] == "/c/llama-server"
    assert cmd[-1] == "--metrics"
    options = dict(zip(cmd[1:-1:2], cmd[2:-1:2]))
    assert options == {"-m": "/c/m.gguf", "--host": "127.0.0.1", "--port": "8123", "-t": "2", "--parallel": "8",
                       "-c": "8192", "--cache-ram": "0"}


def test_peer_settings_follow_the_services_batch_and_window():
    s = cli.peer_settings({}, GPT2_CFG, 2)  # the service's defaults: 8 rows, 2,048 tokens capped at 1,024
    assert (s.threads, s.parallel, s.slot_context, s.context) == (2, 8, 1024, 8192)
    s = cli.peer_settings({"MAX_BATCH_SIZE": "4"}, GPT2_CFG, 2)
    assert (s.parallel, s.context) == (4, 4096)
    assert cli.peer_settings({}, SMOLLM2_CFG, 2).slot_context == 2048
    assert cli.peer_settings({"CONTEXT_TOKENS": "1024"}, SMOLLM2_CFG, 2).slot_context == 1024


def test_completion_body_asks_for_the_same_work():
    greedy = llamacpp.completion_body({"prompts": ["hi"], "max_tokens": 64, "temperature": 0.0})
    assert greedy == {"prompt": "hi", "n_predict": 64, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                      "ignore_eos": True, "cache_prompt": False, "stream": True}
    sampled = llamacpp.completion_body({"prompts": ["hi"], "max_tokens": 8, "temperature": 0.8, "seed": 1003,
                                        "top_k": 50, "top_p": 0.9})
    assert (sampled["temperature"], sampled["top_k"], sampled["top_p"], sampled["seed"]) == (0.8, 50, 0.9, 1003)
    # Every scenario's bodies translate.
    for scenario in config.make_preset("full").scenarios:
        for body in cli.request_bodies(scenario):
            out = llamacpp.completion_body(body)
            assert out["n_predict"] == scenario.max_tokens and out["ignore_eos"] and not out["cache_prompt"]
    with pytest.raises(ValueError, match="one prompt"):
        llamacpp.completion_body({"prompts": ["a", "b"], "max_tokens": 1})


class FakeLlamaServer:
    """POST /completion streamed as llama-server streams it: one event per token with "content"
    and "stop": false, then a final event with "stop": true and the counts, and no [DONE]."""

    def __init__(self, busy_first: int = 0):
        self.busy_left = busy_first
        self.bodies: list[dict] = []

    async def handler(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/completion"
        assert request.headers["connection"] == "close"  # the server closes it after a stream anyway
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.busy_left:
            self.busy_left -= 1
            return httpx.Response(503, headers={"retry-after": "0"}, json={"error": {"code": 503}})
        n, prompt_tokens = body["n_predict"], len(body["prompt"].split())

        async def events():
            for i in range(n):
                await asyncio.sleep(0.001)
                yield (b'data: {"index":0,"content":" x","tokens":[%d],"stop":false,"id_slot":0,'
                       b'"tokens_predicted":%d,"tokens_evaluated":%d}\n\n' % (i, i + 1, prompt_tokens))
            yield (b'data: {"index":0,"content":"","tokens":[],"stop":true,"stop_type":"limit",'
                   b'"tokens_predicted":%d,"tokens_evaluated":%d,"timings":{}}\n\n' % (n, prompt_tokens))

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events())

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)


def test_the_load_generator_drives_the_peer_with_the_services_bodies():
    server = FakeLlamaServer(busy_first=1)
    bodies = [{"prompts": [f"p {i}"], "max_tokens": n, "temperature": 0.0} for i, n in enumerate((5, 1, 3))]
    load = run_load("http://fake", 2, bodies, transport=server.transport, request=llamacpp.stream_completion)
    assert [o.generated_tokens for o in load.outcomes] == [5, 1, 3]
    assert [o.prompt_tokens for o in load.outcomes] == [2, 2, 2]
    assert [o.text for o in load.outcomes] == [" x" * 5, " x", " x" * 3]
    assert {o.finish_reason for o in load.outcomes} == {"length"}
    assert sum(o.rejected_503 for o in load.outcomes) == 1
    for o in load.outcomes:
        assert o.error is None and 0 < o.ttft <= o.final_event <= o.latency
    assert all(b["ignore_eos"] and b["stream"] for b in server.bodies)


def _answer(content: bytes, kind: str = "text/event-stream") -> llamacpp.StreamOutcome:
    async def handler(request):
        return httpx.Response(200, headers={"content-type": kind}, content=content)

    async def go():
        async with httpx.AsyncClient(base_url="http://fake", transport=httpx.MockTransport(handler)) as client:
            return await llamacpp.stream_completion(client, {"prompts": ["hi"], "max_tokens": 2})
    return asyncio.run(go())


def test_stream_completion_names_what_is_wrong():
    assert _answer(b'{"content": "ab"}', "application/json").error.startswith("not a stream")
    assert _answer(b'data: {"content":"a","stop":false}\n\n').error == "the stream ended without its final event"
    assert _answer(b'data: {"error":{"code":500,"message":"boom"}}\n\n').error.startswith(
        "bad stream: the server failed mid-stream")
    assert _answer(b'data: {"content":"","stop":true,"stop_type":"eos"}\n\n').error.startswith(
        "bad stream: final event without tokens_predicted")
    final = b'data: {"content":"","stop":true,"stop_type":"eos","tokens_predicted":1,"tokens_evaluated":1}\n\n'
    assert _answer(final + b'data: {"content":"a","stop":false}\n\n').error.startswith("bad stream: event after")
    ok = _answer(b'data: {"content":"a","stop":false}\n\n' + final)
    assert (ok.error, ok.text, ok.finish_reason, ok.generated_tokens) == (None, "a", "eos_token", 1)


def test_peer_metrics_name_the_generated_tokens_as_the_services():
    m = llamacpp.peer_metrics({"llamacpp:tokens_predicted_total": 640.0, "llamacpp:n_decode_total": 90.0})
    assert m["llm_generated_tokens_total"] == 640.0 and m["llamacpp:n_decode_total"] == 90.0


def test_parse_peers_and_the_phases_each_backend_is_compared_in():
    assert config.parse_peers("llamacpp") == ("llamacpp",) and config.parse_peers("none") == ()
    with pytest.raises(ValueError, match="--peers"):
        config.parse_peers("vllm")
    preset = config.make_preset("full")
    phases = config.llamacpp_phases(preset, tuple(config.BACKENDS.values()))
    assert [(p.name, p.weights, p.backends) for p in phases] == [
        ("llamacpp-q8_0", "q8_0", ("litert-int8",)), ("llamacpp-f32", "f32", ("litert-fp32", "tf"))]
    assert phases[0].scenarios == preset.scenarios
    # f32 runs what litert-fp32 or tf run: their roles, in the preset's order.
    assert [s.name for s in phases[1].scenarios] == ["greedy_c1", "sampled_c1", "greedy_c8", "sampled_c8", "greedy_c32"]
    only_int8 = config.llamacpp_phases(preset, (config.BACKENDS["litert-int8"],))
    assert [p.name for p in only_int8] == ["llamacpp-q8_0"]


def test_a_run_includes_the_peer_once_built_and_says_how_to_build_it(tmp_path):
    def peers(*argv):
        return cli.resolve_peers(cli.build_parser().parse_args(["--cache-dir", str(tmp_path), *argv]))

    assert peers() == ()
    assert peers("--peers", "none") == ()
    assert peers("--build-peers") == ("llamacpp",) == peers("--peers", "llamacpp", "--build-peers")
    with pytest.raises(SystemExit, match=r"llama-server is not built .*add --build-peers"):
        peers("--peers", "llamacpp")
    binary = llamacpp.Layout.of(tmp_path).binary
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    os.chmod(binary, 0o755)
    assert peers() == ("llamacpp",) == peers("--peers", "llamacpp")
    assert peers("--peers", "none") == ()


def test_stage_model_gives_gpt2_its_n_ctx_and_links_the_rest(tmp_path):
    model, weights = tmp_path / "model", tmp_path / "pt" / "model.safetensors"
    model.mkdir()
    weights.parent.mkdir()
    weights.write_bytes(b"w")
    (model / "config.json").write_text(json.dumps(GPT2_CFG))
    (model / "tokenizer.json").write_text("{}")
    (model / "tf_model.h5").write_bytes(b"h5")
    out = llamacpp.stage_model(model, weights, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert json.loads((out / "config.json").read_text())["n_ctx"] == 1024
    assert (out / "model.safetensors").resolve() == weights.resolve()
    assert llamacpp.weights_key(model, weights) == llamacpp.weights_key(model, weights)


def test_only_a_gpt2_style_byte_level_tokenizer_is_named_gpt2(tmp_path):
    def tokenizer(pre, normalizer=None):
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps({"normalizer": normalizer, "pre_tokenizer": pre}))
        return path

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert is_gpt2_byte_level(tokenizer(byte_level))
    assert not is_gpt2_byte_level(tokenizer({**byte_level, "add_prefix_space": True}))
    assert not is_gpt2_byte_level(tokenizer({**byte_level, "use_regex": False}))
    assert not is_gpt2_byte_level(tokenizer({"type": "Sequence", "pretokenizers": [byte_level]}))
    assert not is_gpt2_byte_level(tokenizer(byte_level, {"type": "NFC"}))
    assert not is_gpt2_byte_level(tmp_path / "missing.json")


def _peer_result() -> dict:
    def scenario(name, role, tok_per_s, hwm, tokens=64.0, other=0.0):
        return {"name": name, "role": role, "clients": 8 if role == "batch" else 1, "requests": 2, "ok": 2,
                "temperature": 0.0, "max_tokens": 64, "new_tokens": 128, "tok_per_s": tok_per_s, "req_per_s": 1.0,
                "errors": 0, "responses_503": 0, "latency_p50_s": 0.5, "latency_p95_s": 0.6, "vmhwm_mib": hwm,
                "tokens_per_request": tokens, "cpu": {"own_cores": 1.9, "other_cores": other}}

    ours = {"greedy_c1": scenario("greedy_c1", "single", 150.0, 400.0),
            "greedy_c8": scenario("greedy_c8", "batch", 500.0, 420.0)}
    theirs = {"greedy_c1": scenario("greedy_c1", "single", 100.0, 200.0),
              "greedy_c8": scenario("greedy_c8", "batch", 400.0, 210.0, tokens=63.5, other=1.0)}
    seen = {"texts": {"a": {"x"}, "b": {"y"}}, "prompt_tokens": {"a": {3}, "b": {5}}}
    peer_seen = {"texts": {"a": {"x"}, "b": {"z"}}, "prompt_tokens": {"a": {3}, "b": {6}}}
    peer_phase = {"title": "llama.cpp llama-server, q8_0 GGUF", "weights": "q8_0", "compared_with": ["litert-int8"],
                  "gguf": {"mib": 87.0, "convert_seconds": None},
                  "service": {"warmup_seconds": 0.5, "vmhwm_since_start_mib": 250.0}, "scenarios": theirs,
                  "checks": {"litert-int8": report.peer_checks(seen, peer_seen)}}
    return {"phases": {"litert-int8": {"scenarios": ours, "ratios": {"single_vs_torch_b1": 3.5},
                                       "service": {"vmhwm_since_start_mib": 450.0}}},
            "peers": {"llamacpp": {"version": "version: 1 (0c1e570)", "llama_cpp_commit": "0c1e570",
                                   "llama_cpp_python": "0.3.36",
                                   "settings": {"threads": 2, "parallel": 8, "slot_context": 1024, "context": 8192},
                                   "phases": {"llamacpp-q8_0": peer_phase}}}}


def test_peer_comparison_gives_each_scenarios_ratios_beside_pytorchs():
    result = _peer_result()
    rows = report.peer_comparison(result)
    assert [(r["backend"], r["peer"], r["scenario"]) for r in rows] == [
        ("litert-int8", "llamacpp-q8_0", "greedy_c1"), ("litert-int8", "llamacpp-q8_0", "greedy_c8")]
    one, eight = rows
    assert (one["tok_per_s_ratio"], one["rss_ratio"], one["vs_torch"]) == (1.5, 2.0, 3.5)
    assert (one["same_tokens"], one["shared"]) == (True, False)
    assert eight["tok_per_s_ratio"] == pytest.approx(1.25) and eight["vs_torch"] is None
    assert (eight["same_tokens"], eight["shared"]) == (False, True)
    checks = result["peers"]["llamacpp"]["phases"]["llamacpp-q8_0"]["checks"]["litert-int8"]
    assert checks["prompt_tokens"] == {"prompts": 2, "equal": 1, "differ": [{"prompt": "b", "service": 5, "peer": 6}]}
    assert checks["greedy_texts"] == {"prompts": 2, "identical": 1}

    result["peer_comparison"] = rows
    md = "\n".join(report._peer_section(result))
    assert "`-t 2 --parallel 8 -c 8192` (1024 tokens a slot)" in md
    assert ("| litert-int8 vs llamacpp-q8_0 | greedy_c1 | 150.0 | 100.0 | **1.50×** | 3.50× | 400 | 200 | 2.00× "
            "| 64.0 / 64.0 |") in md
    assert "**1.25×** (shared: unreliable)" in md and "64.0 / 63.5 **differ**" in md
    assert "prompt tokens counted alike for 1 of 2 prompts" in md
    assert "llama.cpp gave 2 of 2 prompts one greedy text in every request" in md
    assert "peak RSS since start 250 MiB (the service's: litert-int8 450 MiB)" in md


def test_throughput_plot_draws_each_peer_phase_dotted_in_its_backends_colour():
    from bench import plots

    result = _peer_result()
    series = {label: (color, style, points) for label, color, style, points in plots.throughput_series(result)}
    assert series["peer, llamacpp-q8_0"] == (plots.BACKEND_COLORS["litert-int8"], ":", [(1, 100.0), (8, 400.0)])
    assert series["service, litert-int8"][1] == "-"
