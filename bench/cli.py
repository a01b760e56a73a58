"""`python -m bench`: baselines, then the service under load, then its peers, then the report.

Order of work, one heavy thing at a time so no measurement shares the cores with another:
1. the PyTorch venv (bench/.venv-torch, made if absent; a Llama-family model is made in it);
2. the model directory (made into the cache if absent: GPT-2 shapes by scripts/make_test_model.py,
   Llama-family shapes by bench/make_model.py), and its LiteRT files
   (scripts/convert_model.py --model-dir, idempotent) when a LiteRT backend runs;
3. the TensorFlow worker (GPT-2 only): converts the weights for PyTorch, then times the naive
   baseline (only when the TF backend is benchmarked: that baseline backs its bar alone);
4. the PyTorch worker: checks its logits against the reference (TensorFlow's for GPT-2, the
   saved model's for the Llama family), then times batch 1 and batch 8;
5. the service, once per backend (--backends), each started cold: warm-up timed, each of that
   backend's scenarios driven over HTTP, then its streaming scenarios (bench/stream.py), peak
   memory from process start recorded;
6. the peers (--peers; by default each one built in the cache): llama.cpp's llama-server
   (bench/llamacpp.py), built before step 1 with --build-peers, its GGUF weights converted before
   step 5, started cold once per weight type (q8_0 beside litert-int8, f32 beside litert-fp32
   and tf) and driven through the same scenarios as the backends it is compared with, measured
   the same way;
7. the per-op profile of one int8 batch-8 decode step (bench/profile_step.py), in its own process;
8. JSON, Markdown and the plots (bench/plots.py) into bench/results/ (timestamped, and copied to
   latest.json / latest.md, the plots under their own names).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import config, llamacpp, plots, report, stream
from bench.baseline import REFERENCE_DIR
from bench.cpu import SHARED_CORES, CpuWindow, own_cpu_seconds
from bench.client import stream_request
from bench.load import run_load
from bench.server import REPO, ServerProcess, Service, histogram_window, parse_labels, parse_metrics
from bench.torch_env import DEFAULT_VENV, ensure_venv
from service.model_files import SAFETENSORS, WEIGHTS, weight_files

BENCH = Path(__file__).resolve().parent
DEFAULT_CACHE = BENCH / ".cache"
DEFAULT_RESULTS = BENCH / "results"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_model(model_dir: Path | None, shape: str, cache: Path, torch_python: str | None = None) -> Path:
    """The model to benchmark: the one given, or a random-weight one of `shape` made in the
    cache: GPT-2's TensorFlow weights by scripts/make_test_model.py (this venv), a Llama-family
    model's bfloat16 safetensors by bench/make_model.py (the PyTorch venv, `torch_python`)."""
    if model_dir is not None:
        if not (model_dir / "config.json").is_file() or not weight_files(model_dir):
            raise SystemExit(f"{model_dir} has no config.json and weights ({WEIGHTS} or {SAFETENSORS})")
        return model_dir
    model_dir = cache / "models" / shape
    llama = config.MODEL_SHAPES[shape] == "llama"
    if not (model_dir / (SAFETENSORS if llama else WEIGHTS)).is_file():
        log(f"writing a random-weight {shape} model to {model_dir}")
        tmp = model_dir.with_name(model_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if llama:
            if torch_python is None:
                raise SystemExit(f"the {shape} model is made in the PyTorch venv; none was given")
            cmd = [torch_python, "-m", "bench.make_model", "--out", str(tmp), "--shape", shape]
        else:
            cmd = [sys.executable, str(REPO / "scripts" / "make_test_model.py"), "--out", str(tmp), "--shape", shape]
        subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        shutil.rmtree(model_dir, ignore_errors=True)
        tmp.rename(model_dir)
    return model_dir


def model_family(model_dir: Path) -> str:
    """gpt2 for a GPT-2 (TensorFlow weights, the tf backend), llama for the Llama family."""
    cfg = json.loads((model_dir / "config.json").read_text())
    return "gpt2" if cfg.get("model_type") == "gpt2" else "llama"


def ensure_litert(model_dir: Path, work: Path) -> dict:
    """The LiteRT files beside the TF weights: scripts/convert_model.py --model-dir (idempotent:
    it returns at once when they are there). Returns its time and the int8 gate's verdict."""
    script = REPO / "scripts" / "convert_model.py"
    if not script.is_file():
        raise SystemExit(f"{script} is missing: the LiteRT backends need it (or run with --backends tf)")
    log(f"LiteRT files: scripts/convert_model.py --model-dir {model_dir}")
    start = time.monotonic()
    with (work / "convert_model.log").open("w") as out:
        proc = subprocess.run([sys.executable, str(script), "--model-dir", str(model_dir)], cwd=REPO,
                              stdout=out, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        tail = "\n".join((work / "convert_model.log").read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"scripts/convert_model.py failed ({proc.returncode}):\n{tail}")
    info: dict = {"seconds": seconds, "files": sorted(p.name for p in model_dir.iterdir() if p.is_file()
                                                      and (p.suffix in (".tflite", ".npy") or p.name == "litert.json"))}
    gate_path = model_dir / "litert.json"
    if gate_path.is_file():
        gate = json.loads(gate_path.read_text())
        info["litert_json"] = gate
        info["gate"] = _gate_summary(gate)
    log(f"LiteRT files ready after {seconds:.1f} s")
    return info


def _gate_summary(gate: dict) -> dict:
    """The int8 gate's decision (what LITERT_PRECISION=auto serves) and its reason, from litert.json."""
    quality = gate.get("quality") or {}
    decision = None
    if "int8_enabled" in quality:
        decision = "int8" if quality["int8_enabled"] else "fp32"
    figures = [f"{k.replace('_', ' ')} {quality[k]:.4g}" for k in ("agreement", "perplexity_rise")
               if isinstance(quality.get(k), (int, float))]
    summary = "; ".join(filter(None, [quality.get("reason"), ", ".join(figures)]))
    return {"decision": decision, "summary": summary[:300]}


def model_summary(model_dir: Path) -> dict:
    cfg = json.loads((model_dir / "config.json").read_text())
    layers, width = cfg.get("n_layer", cfg.get("num_hidden_layers")), cfg.get("n_embd", cfg.get("hidden_size"))
    summary = f"{layers} layers, {width} wide, {cfg.get('vocab_size')} vocab"
    if model_family(model_dir) == "llama":
        summary = (f"{(cfg.get('architectures') or [cfg.get('model_type')])[0]}: {summary}, "
                   f"{cfg.get('num_attention_heads')} heads, {cfg.get('num_key_value_heads')} key/value heads, "
                   f"MLP {cfg.get('intermediate_size')}, "
                   + ("tied" if cfg.get("tie_word_embeddings") else "untied") + " embeddings")
    weights = weight_files(model_dir)
    return {
        "dir": str(model_dir),
        "summary": summary,
        "n_layer": layers, "n_embd": width, "vocab_size": cfg.get("vocab_size"),
        "family": model_family(model_dir),
        # What the weights file holds (the engines and the baselines compute in fp32 either way).
        "weights": f"{weights[0] if weights else 'no weights'}, {cfg.get('torch_dtype', 'float32')}",
    }


def weights_key(model_dir: Path) -> str:
    """Names the PyTorch conversion of exactly these TF weights (path, size, mtime)."""
    st = (model_dir / WEIGHTS).stat()
    ident = f"{model_dir.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def run_worker(python: str, job: dict, work: Path, name: str) -> dict:
    job_path, out_path, log_path = work / f"{name}-job.json", work / f"{name}-out.json", work / f"{name}.log"
    job_path.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log_path.open("w") as err:
        proc = subprocess.run([python, "-m", "bench.baseline", str(job_path), str(out_path)],
                              cwd=REPO, env=env, stderr=err)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"baseline worker {name} failed ({proc.returncode}); {log_path}:\n{tail}")
    return json.loads(out_path.read_text())


def service_revision() -> dict:
    """The commit benchmarked, and whether service/ differed from it (a benchmark of a dirty tree)."""
    def git(*args):
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None
    status = git("status", "--porcelain", "--", "service")
    return {"commit": git("rev-parse", "--short", "HEAD"), "service_dirty": bool(status) if status is not None else None}


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--service-env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def request_bodies(scenario: config.Scenario) -> list[dict]:
    bodies = []
    for i, prompt in enumerate(scenario.request_prompts()):
        body = {"prompts": [prompt], "max_tokens": scenario.max_tokens, "temperature": scenario.temperature}
        if scenario.sampled:
            body["seed"] = 1000 + i
        if scenario.top_k:
            body["top_k"] = scenario.top_k
        if scenario.top_p < 1.0:
            body["top_p"] = scenario.top_p
        bodies.append(body)
    return bodies


def run_service(preset: config.Preset, backend: config.Backend, model_dir: Path, work: Path,
                env: dict[str, str], health_timeout: float, phase_load: dict, retries: int) -> dict:
    """Start the service cold with `backend`, drive its scenarios; return the phase's raw results."""
    env = {**env, **backend.env}
    log(f"[{backend.name}] starting the service")
    phase_load[f"{backend.name} service"] = round(os.getloadavg()[0], 2)
    with Service(model_dir, work / f"service-{backend.name}.log", env, health_timeout=health_timeout) as svc:
        log(f"[{backend.name}] healthy after {svc.warmup_seconds:.1f} s on {svc.base_url}: {svc.health}")
        text = svc.metrics_text()
        metrics = parse_metrics(text)
        health, backend_info = svc.health or {}, parse_labels(text, "llm_backend_info")
        served = (health.get("backend"), health.get("precision"))
        if served[0] != backend.backend or (backend.precision and served[1] != backend.precision):
            raise SystemExit(f"[{backend.name}] asked for backend={backend.backend} precision={backend.precision} "
                             f"with {backend.env}, but /health says {health}")
        service = {"warmup_seconds": svc.warmup_seconds, "warmup_cpu": svc.warmup_cpu,
                   "llm_warmup_seconds": metrics.get("llm_warmup_seconds"), "env": env,
                   "memory_after_warmup": svc.memory(),
                   "compiles_after_warmup_at_ready": metrics.get("llm_compiles_after_warmup_total")}
        driven = drive_scenarios(svc, preset.scenarios_for(backend), backend.name, preset.max_tokens, phase_load,
                                 retries)
        streams = run_stream_scenarios(svc, preset.stream_scenarios_for(backend), backend.name, phase_load, retries)
        final = svc.metrics()
        service["compiles_after_warmup"] = final.get("llm_compiles_after_warmup_total")
        service["generated_tokens_total"] = final.get("llm_generated_tokens_total")
        service["memory_at_end"] = svc.memory()
        service["vmhwm_since_start_mib"] = max(driven["peak"], service["memory_at_end"]["vmhwm_mib"])
    log(f"[{backend.name}] service stopped")
    return {"title": backend.title, "exact_text": backend.exact_text, "health": health,
            "backend_info": backend_info, "service": service, "scenarios": driven["scenarios"],
            "stream_scenarios": streams, "texts": driven["texts"], "prompt_tokens": driven["prompt_tokens"]}


def drive_scenarios(svc: ServerProcess, scenarios: tuple[config.Scenario, ...], label: str, max_tokens: int,
                    phase_load: dict, retries: int, request=stream_request) -> dict:
    """One untimed request, then each scenario against the running server `svc` (the service,
    or a peer with its own `request`), each measured again while shared (least_shared).

    Returns the results by scenario name; every greedy text and prompt token count each prompt
    got, by prompt (sets: one member when every request agreed); and the server's peak RSS
    since start as read before and after each scenario.
    """
    results: dict[str, dict] = {}
    texts: dict[str, set] = {}
    prompt_tokens: dict[str, set] = {}
    # One untimed request first, as each baseline gets one untimed generate: the first
    # answer after /health may still pay for thread pools and lazy allocations.
    prime = run_load(svc.base_url, 1, [{"prompts": [config.SHORT_PROMPT], "max_tokens": max_tokens,
                                        "temperature": 0.0}], request=request)
    if prime.outcomes[0].error:
        raise SystemExit(f"[{label}] the priming request failed: {prime.outcomes[0].error}\n{svc.log_tail()}")
    peak_so_far = 0.0
    for scenario in scenarios:
        phase_load[f"{label} {scenario.name}"] = round(os.getloadavg()[0], 2)
        bodies = request_bodies(scenario)

        def attempt() -> dict:
            nonlocal peak_so_far
            log(f"[{label}] {scenario.name}: {scenario.clients} clients, {scenario.requests} requests")
            before = svc.metrics()
            peak_so_far = max(peak_so_far, svc.memory()["vmhwm_mib"])
            peak_reset = svc.reset_peak()
            # Ours: the server and this process, which is the load generator.
            window = CpuWindow(lambda: svc.cpu_seconds() + own_cpu_seconds()).start()
            load = run_load(svc.base_url, scenario.clients, bodies, request=request)
            cpu = window.stop()
            after = svc.metrics()
            memory = svc.memory()
            peak_so_far = max(peak_so_far, memory["vmhwm_mib"])
            s = report.scenario_result(scenario, load, before, after, memory)
            # With the reset, VmHWM is this scenario's own peak; without, the peak since start.
            s["vmhwm_is_scenario_peak"] = peak_reset
            s["cpu"] = cpu
            log(f"[{label}] {scenario.name}: {report.fmt(s['tok_per_s'])} tok/s, "
                f"p95 {report.fmt(s['latency_p95_s'], '.2f')} s, TTFT p95 {report.fmt(s['ttft_p95_s'], '.3f')} s, "
                f"TPOT p95 {report.fmt(s['tpot_p95_s'] and s['tpot_p95_s'] * 1000, '.1f')} ms, {s['errors']} errors, {s['responses_503']} 503s, "
                f"VmHWM {s['vmhwm_mib']:.0f} MiB (since start {peak_so_far:.0f}), "
                f"cores ours/others {cpu['own_cores']}/{cpu['other_cores']}")
            for o in load.outcomes:
                if o.latency is None:
                    continue
                if o.prompt_tokens is not None:
                    prompt_tokens.setdefault(o.prompt, set()).add(o.prompt_tokens)
                if scenario.checks_texts:  # a complete stream: its pieces joined are the text
                    texts.setdefault(o.prompt, set()).add(o.text)
            return s

        best = least_shared(attempt, retries, f"[{label}] {scenario.name}")
        best["vmhwm_since_start_mib"] = peak_so_far
        results[scenario.name] = best
    return {"scenarios": results, "texts": texts, "prompt_tokens": prompt_tokens, "peak": peak_so_far}


def run_peer(phase: config.PeerPhase, binary: Path, gguf: dict, settings: llamacpp.ServerSettings, work: Path,
             max_tokens: int, health_timeout: float, phase_load: dict, retries: int) -> dict:
    """Start llama-server cold on `gguf`, drive the phase's scenarios as the service's are driven
    (same bodies, same load generator, same memory and CPU readings); the phase's raw results."""
    label = phase.name
    log(f"[{label}] starting {llamacpp.SERVER} on {Path(gguf['path']).name}")
    phase_load[f"{label} server"] = round(os.getloadavg()[0], 2)
    server = llamacpp.LlamaServer(binary, Path(gguf["path"]), settings, work / f"{label}.log",
                                  health_timeout=health_timeout)
    with server as svc:
        log(f"[{label}] healthy after {svc.warmup_seconds:.1f} s on {svc.base_url}")
        service = {"warmup_seconds": svc.warmup_seconds, "warmup_cpu": svc.warmup_cpu,
                   "memory_after_warmup": svc.memory(), "command": svc.command()}
        driven = drive_scenarios(svc, phase.scenarios, label, max_tokens, phase_load, retries,
                                 request=llamacpp.stream_completion)
        service["generated_tokens_total"] = svc.metrics().get("llm_generated_tokens_total")
        service["memory_at_end"] = svc.memory()
        service["vmhwm_since_start_mib"] = max(driven["peak"], service["memory_at_end"]["vmhwm_mib"])
    log(f"[{label}] {llamacpp.SERVER} stopped")
    return {"title": f"llama.cpp {llamacpp.SERVER}, {phase.weights} GGUF", "weights": phase.weights,
            "compared_with": list(phase.backends), "gguf": gguf, "service": service,
            "scenarios": driven["scenarios"], "texts": driven["texts"], "prompt_tokens": driven["prompt_tokens"]}


def least_shared(measure, retries: int, label: str) -> dict:
    """`measure()` once, and again while other processes took CPU during it (this machine may be
    shared), up to `retries` more times; the least shared result, its `attempts` counted."""
    best, attempts = None, 0
    while attempts == 0 or (best["cpu"]["other_cores"] or 0) > SHARED_CORES and attempts <= retries:
        if attempts:
            log(f"{label}: other processes used {best['cpu']['other_cores']:.2f} cores; again")
        s = measure()
        attempts += 1
        if best is None or (s["cpu"]["other_cores"] or 0) < (best["cpu"]["other_cores"] or 0):
            best = s
    best["attempts"] = attempts
    return best


# The server's histograms and counters of issue 8, read over each streaming measurement.
STREAM_HISTOGRAMS = {"ttft": "llm_time_to_first_token_seconds", "tpot": "llm_time_per_output_token_seconds",
                     "queue_wait": "llm_queue_wait_seconds"}


def measure_stream(svc: Service, drive) -> dict:
    """`drive(base_url)` (a coroutine function from bench.stream) in a CPU window, with the
    server's token count, histograms and cancelled rows over the same window."""
    before = svc.metrics_text()
    window = CpuWindow(lambda: svc.cpu_seconds() + own_cpu_seconds()).start()
    s = asyncio.run(drive(svc.base_url))
    s["cpu"] = window.stop()
    after = svc.metrics_text()
    m0, m1 = parse_metrics(before), parse_metrics(after)

    def delta(metric):
        return int(round(m1[metric] - m0.get(metric, 0.0))) if metric in m1 else None

    s["new_tokens_server"] = delta("llm_generated_tokens_total")
    s["rows_cancelled"] = delta("llm_rows_cancelled_total")
    s["short_lane_rows"] = delta("llm_short_lane_rows_total")  # None where the backend has no lane
    s["short_lane_calls"] = delta("llm_short_lane_calls_total")
    s["server"] = {key: histogram_window(before, after, metric) for key, metric in STREAM_HISTOGRAMS.items()}
    return s


def run_stream_scenarios(svc: Service, scenarios: tuple, backend: str, phase_load: dict, retries: int) -> dict:
    """Issue 8's scenarios against the running service, after the others; results by name."""
    results: dict[str, dict] = {}
    if not scenarios:
        return results
    primed = asyncio.run(stream.prime(svc.base_url, config.SHORT_PROMPT, 8))
    if primed.error:
        log(f"[{backend}] the priming streamed request failed: {primed.error}")
    for sc in scenarios:
        phase_load[f"{backend} {sc.name}"] = round(os.getloadavg()[0], 2)
        label = f"[{backend}] {sc.name}"
        if isinstance(sc, config.HeadOfLine):
            log(f"{label}: {sc.short_max_tokens}-token request idle x{sc.idle_repetitions}, then x{sc.repetitions} "
                f"beside {sc.long_clients} streams of {sc.long_max_tokens} tokens")
            r = least_shared(lambda: measure_stream(svc, lambda url: stream.head_of_line(url, sc)), retries, label)
            log(f"{label}: {report.fmt(r['loaded_latency_p50_s'], '.3f')} s under load vs "
                f"{report.fmt(r['idle_latency_p50_s'], '.3f')} s idle ({report.fmt(r['ratio'], '.2f')}x), "
                f"{r['errors']} errors")
        elif isinstance(sc, config.UnevenLoad):
            r = {"name": sc.name, "role": sc.role, "clients": sc.clients, "rounds": sc.rounds,
                 "max_tokens_range": list(sc.max_tokens_range), "think_max_s": sc.think_max_s, "seed": sc.seed}
            for half in ("lockstep", "uneven"):
                log(f"{label} ({half}): {sc.clients} clients, {sc.rounds} rounds")
                r[half] = least_shared(lambda: measure_stream(
                    svc, lambda url: stream.uneven_load(url, sc, lockstep=half == "lockstep")), retries,
                    f"{label} ({half})")
                log(f"{label} ({half}): {report.fmt(r[half]['tok_per_s'])} tok/s, TTFT p95 "
                    f"{report.fmt(r[half]['ttft_p95_s'], '.3f')} s, {r[half]['errors']} errors")
        else:
            log(f"{label}: {sc.max_tokens} tokens at batch 1, unstreamed, streamed and 1 token, x{sc.repetitions}")
            r = least_shared(lambda: measure_stream(svc, lambda url: stream.stream_overhead(url, sc)), retries, label)
            log(f"{label}: streamed {report.fmt(r['ratio'], '.3f')}x unstreamed, first piece "
                f"{report.fmt(r['first_piece_p50_s'], '.4f')} s (bound "
                f"{report.fmt(r['first_piece_bound_s'], '.4f')} s), {r['errors']} errors")
        results[sc.name] = r
    return results


def phase_result(preset: config.Preset, backend: config.Backend, raw: dict, baselines: dict) -> dict:
    """Bars, ratios and consistency checks of one backend's phase."""
    texts = raw.pop("texts")
    bars, ratios = report.compute_bars(backend.name, raw["scenarios"], baselines, raw["service"],
                                       raw["stream_scenarios"], preset.name, preset.model_shape)
    checks = report.consistency_checks(
        raw["scenarios"], baselines, {p: next(iter(t)) for p, t in texts.items() if len(t) == 1})
    checks["greedy_deterministic"] = {
        "prompts": len(texts), "same_text_every_request": sum(len(t) == 1 for t in texts.values())}
    return {**raw, "bars": report.bars_as_dicts(bars), "ratios": ratios, "checks": checks}


def run_profiles(preset: config.Preset, model_dir: Path, work: Path, args) -> list[dict]:
    """bench/profile_step.py in its own process, once per cache size (after the service phases,
    so it shares no cores with them)."""
    profiles = []
    caches = preset.profile_caches if args.profile_cache is None else [
        int(c) for c in args.profile_cache.split(",") if c.strip()]
    for cache in caches:
        out_json, out_log = work / f"profile-c{cache}.json", work / f"profile-c{cache}.txt"
        cmd = [sys.executable, "-m", "bench.profile_step", "--model-dir", str(model_dir), "--precision", "int8",
               "--batch", str(args.profile_batch), "--cache", str(cache), "--json", str(out_json),
               *preset.profile_args]
        log(f"per-op profile: {' '.join(cmd[1:])}")
        with out_log.open("w") as out:
            proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
        if proc.returncode != 0 or not out_json.is_file():
            tail = "\n".join(out_log.read_text(errors="replace").splitlines()[-5:])
            log(f"per-op profile failed ({proc.returncode}); {out_log}")
            profiles.append({"error": f"exit {proc.returncode}: {tail}", "cache": cache})
            continue
        summary = json.loads(out_json.read_text())
        summary.pop("raw", None)  # per-op rows stay in the profile's own file
        profiles.append(summary)
    return profiles


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmark the text-generation service "
                                "against transformers' generate on TensorFlow (naive) and PyTorch, and beside "
                                "llama.cpp's llama-server.")
    p.add_argument("--preset", choices=config.PRESETS,
                   help="full: DistilGPT2 shape, 64 tokens, 1/8/32 clients (the default for GPT-2 shapes); tiny: a "
                   "quick end-to-end check; llama: small scope for the Llama-family shapes, 1 and 8 clients, "
                   "LiteRT int8 and fp32 (the default for those shapes)")
    p.add_argument("--model-shape", choices=tuple(config.MODEL_SHAPES), help="the random-weight model's shape "
                   "(default: the preset's: distilgpt2, tiny, smollm2-135m); smollm2-135m and qwen2.5-0.5b are "
                   "SmolLM2-135M-Instruct's and Qwen2.5-0.5B-Instruct's")
    p.add_argument("--backends", type=config.parse_backends,
                   help="service backends to benchmark, each in its own cold phase, in this order (default: the "
                   f"preset's, {','.join(config.DEFAULT_BACKENDS)} for GPT-2, without tf for the Llama family); "
                   "e.g. --backends litert-int8 to bound run time")
    p.add_argument("--peers", type=config.parse_peers,
                   help="other servers run on the same weights through the same scenarios, each in its own cold "
                   "phase after the service's, and reported beside it: llamacpp (llama.cpp's llama-server, q8_0 GGUF "
                   "beside litert-int8, f32 beside litert-fp32 and tf), or none (default: every peer built in the "
                   "cache)")
    p.add_argument("--build-peers", action="store_true",
                   help="fetch and build the peers not built yet, then run them (llama-server: llama-cpp-python's "
                   "sdist from PyPI, then cmake and ninja; about 9 minutes on 2 cores, cached)")
    p.add_argument("--no-profile", action="store_true", help="skip the per-op profile of the int8 decode step")
    p.add_argument("--profile-batch", type=int, default=8, help="rows in the profiled decode step (default 8)")
    p.add_argument("--profile-cache", help="cache slots in the profiled decode step, one profile per "
                   "comma-separated size (default: 256,640 for full and tiny, the mixed prompts' size and the long "
                   "prompts'; none for llama)")
    p.add_argument("--model-dir", type=Path, help="model to serve (default: a random-weight model of the "
                   "preset's shape, made in the cache)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="models and converted weights")
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--torch-venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline (its bars read n/a)")
    p.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the service, e.g. MAX_BATCH_SIZE=8 (repeatable)")
    p.add_argument("--health-timeout", type=float, help="seconds to wait for /health ok "
                   "(default: 600 for full and llama, 300 for tiny)")
    p.add_argument("--retries-when-shared", type=int, help="measure a baseline run or scenario again, up to this "
                   f"many times, while other processes use more than {SHARED_CORES} cores during it; the least "
                   "shared attempt counts (default: 2 for full, 1 for llama, 0 for tiny)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a bar does not hold")
    p.add_argument("--publish", type=Path, metavar="DIR", help="also copy the result (as latest.md and latest.json) "
                   "and its plots to DIR, e.g. docs/benchmark, the documentation's latest results")
    return p


def resolve(args: argparse.Namespace) -> tuple[config.Preset, tuple[config.Backend, ...]]:
    """The preset and the backends a command line asks for."""
    preset = config.make_preset(args.preset or config.default_preset(args.model_shape), args.model_shape)
    backends: tuple[config.Backend, ...] = args.backends or tuple(config.BACKENDS[b] for b in preset.backends)
    if preset.family != "gpt2" and any(b.backend == "tf" for b in backends):
        raise SystemExit(f"the tf backend serves GPT-2's TensorFlow weights only, not {preset.model_shape}")
    return preset, backends


def resolve_peers(args: argparse.Namespace) -> tuple[str, ...]:
    """The peers a command line asks for: --peers as given, else every peer built in the cache
    (every peer with --build-peers). An asked peer that is not built, without --build-peers,
    ends the run at once with one line saying how to build it."""
    built = llamacpp.built(args.cache_dir) is not None
    if args.peers is None:
        return config.PEERS if args.build_peers or built else ()
    if args.peers and not built and not args.build_peers:
        raise SystemExit(f"{llamacpp.SERVER} is not built ({llamacpp.Layout.of(args.cache_dir).binary} is missing): "
                         "add --build-peers to fetch llama.cpp and build it (about 9 minutes on 2 cores, once), "
                         "or run with --peers none")
    return args.peers


def peer_settings(service_env: dict[str, str], model_cfg: dict, threads: int) -> llamacpp.ServerSettings:
    """llama-server sized as the service runs: as many slots as the service batches rows
    (MAX_BATCH_SIZE), each with the context the service serves a row (CONTEXT_TOKENS, capped at
    the model's window), on the same `threads`. The defaults are the service's own."""
    from service.config import Settings

    defaults = Settings.model_fields
    window = model_cfg.get("n_positions") or model_cfg.get("max_position_embeddings")
    context = int(service_env.get("CONTEXT_TOKENS", defaults["context_tokens"].default))
    return llamacpp.ServerSettings(threads=threads,
                                   parallel=int(service_env.get("MAX_BATCH_SIZE", defaults["max_batch_size"].default)),
                                   slot_context=min(context, window) if window else context)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    preset, backends = resolve(args)
    names = [b.name for b in backends]
    peers = resolve_peers(args)
    peer_phases = config.llamacpp_phases(preset, backends) if "llamacpp" in peers else ()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    # The llama preset's runs name their shape: one preset, several models.
    work = args.results_dir / (f"{stamp}-{preset.name}" + (f"-{preset.model_shape}" if preset.name == "llama" else ""))
    work.mkdir(parents=True, exist_ok=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    revision = service_revision()  # before the run: the tree may change while it runs
    command = "./bench/run.sh" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))

    binary = llamacpp.built(args.cache_dir)
    if peer_phases and binary is None:
        # Before anything is measured: the build takes both cores for minutes.
        try:
            binary = llamacpp.build_server(args.cache_dir, log)
        except (llamacpp.PeerError, subprocess.CalledProcessError) as exc:
            raise SystemExit(f"building {llamacpp.SERVER} failed: {exc}") from exc
    if peer_phases:
        log(f"peer: {binary} ({llamacpp.server_version(binary)}), phases {', '.join(p.name for p in peer_phases)}")
    elif "llamacpp" not in peers:
        why = "--peers none" if args.peers is not None else "not built; --build-peers builds it"
        log(f"peer llamacpp: not run ({why})")

    torch_info = None
    # A Llama-family model is made in the PyTorch venv, baseline or not; llama.cpp's converter runs there too.
    if not args.no_torch or (args.model_dir is None and preset.family == "llama") or peer_phases:
        torch_info = ensure_venv(args.torch_venv, log=log)
        log(f"PyTorch venv ready: torch {torch_info['torch']}, {torch_info['threads']} threads"
            + (f" (created in {torch_info['install_seconds']:.0f} s)" if torch_info["created"] else ""))
    torch_python = torch_info and torch_info["python_path"]
    model_dir = ensure_model(args.model_dir, preset.model_shape, args.cache_dir, torch_python).resolve()
    if args.no_torch:
        torch_info = None
    family = model_family(model_dir)
    if family != "gpt2" and "tf" in names:
        raise SystemExit(f"the tf backend serves GPT-2's TensorFlow weights only; {model_dir} is not a GPT-2")
    log(f"preset {preset.name}, model {model_dir}, backends {','.join(names)}")
    litert = ensure_litert(model_dir, work) if any(b.backend == "litert" for b in backends) else None

    retries = args.retries_when_shared if args.retries_when_shared is not None else preset.retries_when_shared
    # GPT-2: PyTorch reads the weights the TF worker converts (cached by weights_key). The Llama
    # family: PyTorch reads the model directory's own safetensors, against the reference logits
    # bench/make_model.py left beside them.
    pt_dir = args.cache_dir / "pt" / weights_key(model_dir) if family == "gpt2" else None
    # The naive TF baseline only backs the TF backend's bar; it is slow, so it runs only then.
    tf_runs = preset.tf_runs if "tf" in names else ()
    tf_job = {"framework": "tf", "model_dir": str(model_dir), "runs": [r.job() for r in tf_runs],
              "retries_when_shared": retries}
    # The GGUF files of a GPT-2 are converted from the same safetensors.
    if (torch_info or peer_phases) and pt_dir is not None and not (pt_dir / SAFETENSORS).is_file():
        tf_job["convert_to"] = str(pt_dir)
    # The 1-minute load average as each phase starts: this machine may be shared, and a busy
    # neighbour shows here before it shows as a slow figure.
    phase_load: dict[str, float] = {}
    tf_out, baseline_raw = {"versions": None}, {}
    if tf_runs or "convert_to" in tf_job:
        phase_load["tf_baseline"] = round(os.getloadavg()[0], 2)
        log("TensorFlow worker: " + ("naive eager generate, one request at a time" if tf_runs
                                     else "weights for PyTorch only"))
        tf_out = run_worker(sys.executable, tf_job, work, "tf")
        baseline_raw = {f"tf:{r['name']}": r for r in tf_out["runs"]}
    if torch_info:
        phase_load["torch_baseline"] = round(os.getloadavg()[0], 2)
        log("PyTorch worker: generate at batch 1 and batch 8")
        pt_job = {"framework": "pt", "model_dir": str(model_dir),
                  "runs": [r.job() for r in preset.torch_runs], "retries_when_shared": retries}
        if pt_dir is not None:
            pt_job.update(weights_dir=str(pt_dir), reference_dir=str(pt_dir))
        else:
            pt_job["reference_dir"] = str(model_dir / REFERENCE_DIR)
        pt_out = run_worker(torch_info["python_path"], pt_job, work, "pt")
        torch_info["logits_check"] = pt_out["logits_check"]
        torch_info["peak_rss_mib"] = pt_out.get("peak_rss_mib")
        baseline_raw.update({f"pt:{r['name']}": r for r in pt_out["runs"]})
    baselines = {k: {**report.baseline_result(r, k.split(":")[0]), "texts": r["texts"]} for k, r in baseline_raw.items()}

    service_env = {**preset.service_env, **parse_env(args.service_env)}
    health_timeout = args.health_timeout or preset.health_timeout
    ggufs, settings = {}, None
    if peer_phases:
        weights = (pt_dir if pt_dir is not None else model_dir) / SAFETENSORS
        for phase in peer_phases:
            try:
                ggufs[phase.weights] = llamacpp.ensure_gguf(model_dir, weights, phase.weights, args.cache_dir,
                                                            torch_python, log)
            except llamacpp.PeerError as exc:
                raise SystemExit(str(exc)) from exc
        settings = peer_settings(service_env, json.loads((model_dir / "config.json").read_text()),
                                 len(os.sched_getaffinity(0)))

    phases, seen = {}, {}
    for backend in backends:
        raw = run_service(preset, backend, model_dir, work, service_env, health_timeout, phase_load, retries)
        seen[backend.name] = {"texts": raw["texts"], "prompt_tokens": raw.pop("prompt_tokens")}
        phases[backend.name] = phase_result(preset, backend, raw, baselines)

    peer_results = {}
    for phase in peer_phases:
        raw = run_peer(phase, binary, ggufs[phase.weights], settings, work, preset.max_tokens, health_timeout,
                       phase_load, retries)
        raw["checks"] = {b: report.peer_checks(seen[b], raw) for b in phase.backends}
        raw.pop("texts"), raw.pop("prompt_tokens")
        peer_results[phase.name] = raw

    profiles = []
    if "litert-int8" in names and not args.no_profile:
        profiles = run_profiles(preset, model_dir, work, args)

    result = {
        "preset": preset.name,
        "started_at": started_at,
        "command": command,
        "machine": report.machine_facts(),
        "revision": revision,
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "load_at_phase_start": phase_load,
        "model": {"shape": preset.model_shape, **model_summary(model_dir)},
        "max_tokens": preset.max_tokens,
        "long_max_tokens": preset.long_max_tokens,
        "temperature": config.SAMPLING_TEMPERATURE,
        "retries_when_shared": retries,
        "backends": names,
        "litert": litert,
        "tf": {"versions": tf_out["versions"]},
        "torch": torch_info,
        "phases": phases,
        "baselines": {k: {kk: vv for kk, vv in v.items() if kk != "texts"} for k, v in baselines.items()},
        "bars": [bar for p in phases.values() for bar in p["bars"]],
        # The first is the batch-8 decode step at the default cache (256 slots) the issue asks for.
        "profile": profiles[0] if profiles else None,
        "profiles": profiles,
        "peers": {"llamacpp": {
            "binary": str(binary), "version": llamacpp.server_version(binary),
            "llama_cpp_python": llamacpp.LLAMA_CPP_PYTHON, "llama_cpp_commit": llamacpp.LLAMA_CPP_COMMIT,
            "settings": {**dataclasses.asdict(settings), "context": settings.context},
            "phases": peer_results}} if peer_results else {},
    }
    result["peer_comparison"] = report.peer_comparison(result)
    result["plots"] = plots.draw(result, work, log)
    md = report.markdown(result)
    report.save(result, md, work, args.results_dir, "latest")
    if args.publish:
        report.save(result, md, work, args.publish, "latest")
    print(md, flush=True)
    log(f"wrote {work / 'result.json'}, {work / 'result.md'} and {', '.join(result['plots']) or 'no plots'} "
        f"(also {args.results_dir}/latest.*)")
    if args.strict and any(b["holds"] is False for b in result["bars"]):
        return 1
    return 0
