"""`python -m bench`: baselines, then the service under load, then the report.

Order of work, one heavy thing at a time so no measurement shares the cores with another:
1. the model directory (made with scripts/make_test_model.py into the cache if absent);
2. the PyTorch venv (bench/.venv-torch, made if absent);
3. the TensorFlow worker: converts the weights for PyTorch, then times the naive baseline;
4. the PyTorch worker: checks its logits against TensorFlow's, then times batch 1 and batch 8;
5. the service: started cold, warm-up timed, each scenario driven over HTTP;
6. JSON and Markdown into bench/results/ (timestamped, and copied to latest.json / latest.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import config, report
from bench.cpu import CpuWindow, own_cpu_seconds
from bench.load import run_load
from bench.server import REPO, Service
from bench.torch_env import DEFAULT_VENV, ensure_venv

BENCH = Path(__file__).resolve().parent
DEFAULT_CACHE = BENCH / ".cache"
DEFAULT_RESULTS = BENCH / "results"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure_model(model_dir: Path | None, shape: str, cache: Path) -> Path:
    if model_dir is not None:
        if not (model_dir / "config.json").is_file() or not (model_dir / "tf_model.h5").is_file():
            raise SystemExit(f"{model_dir} has no config.json and tf_model.h5")
        return model_dir
    model_dir = cache / "models" / shape
    if not (model_dir / "tf_model.h5").is_file():
        log(f"writing a random-weight {shape} model to {model_dir}")
        tmp = model_dir.with_name(model_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_test_model.py"), "--out", str(tmp),
                        "--shape", shape], check=True, cwd=REPO)
        shutil.rmtree(model_dir, ignore_errors=True)
        tmp.rename(model_dir)
    return model_dir


def model_summary(model_dir: Path) -> dict:
    cfg = json.loads((model_dir / "config.json").read_text())
    return {
        "dir": str(model_dir),
        "summary": f"{cfg.get('n_layer')} layers, {cfg.get('n_embd')} wide, {cfg.get('vocab_size')} vocab",
        "n_layer": cfg.get("n_layer"), "n_embd": cfg.get("n_embd"), "vocab_size": cfg.get("vocab_size"),
    }


def weights_key(model_dir: Path) -> str:
    """Names the PyTorch conversion of exactly these TF weights (path, size, mtime)."""
    st = (model_dir / "tf_model.h5").stat()
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
        bodies.append(body)
    return bodies


def run_service(preset: config.Preset, model_dir: Path, work: Path, env: dict[str, str],
                health_timeout: float, phase_load: dict) -> tuple[dict, dict, dict]:
    """Start the service cold, drive every scenario; return service facts, scenario results and greedy texts."""
    scenarios: dict[str, dict] = {}
    service_texts: dict[str, set] = {}
    log("starting the service")
    with Service(model_dir, work / "service.log", env, health_timeout=health_timeout) as svc:
        log(f"service healthy after {svc.warmup_seconds:.1f} s on {svc.base_url}")
        metrics = svc.metrics()
        service = {"warmup_seconds": svc.warmup_seconds, "warmup_cpu": svc.warmup_cpu,
                   "llm_warmup_seconds": metrics.get("llm_warmup_seconds"), "env": env,
                   "memory_after_warmup": svc.memory(),
                   "compiles_after_warmup_at_ready": metrics.get("llm_compiles_after_warmup_total")}
        # One untimed request first, as each baseline gets one untimed generate: the first
        # answer after /health may still pay for thread pools and lazy allocations.
        prime = run_load(svc.base_url, 1, [{"prompts": [config.SHORT_PROMPT], "max_tokens": preset.max_tokens,
                                            "temperature": 0.0}])
        if prime.outcomes[0].error:
            raise SystemExit(f"the priming request failed: {prime.outcomes[0].error}\n{svc.log_tail()}")
        peak_so_far = 0.0
        for scenario in preset.scenarios:
            phase_load[scenario.name] = round(os.getloadavg()[0], 2)
            bodies = request_bodies(scenario)
            log(f"{scenario.name}: {scenario.clients} clients, {scenario.requests} requests")
            before = svc.metrics()
            peak_so_far = max(peak_so_far, svc.memory()["vmhwm_mib"])
            peak_reset = svc.reset_peak()
            # Ours: the server and this process, which is the load generator.
            window = CpuWindow(lambda: svc.cpu_seconds() + own_cpu_seconds()).start()
            load = run_load(svc.base_url, scenario.clients, bodies)
            cpu = window.stop()
            after = svc.metrics()
            memory = svc.memory()
            peak_so_far = max(peak_so_far, memory["vmhwm_mib"])
            s = report.scenario_result(scenario, load, before, after, memory)
            # With the reset, VmHWM is this scenario's own peak; without, the peak since start.
            s["vmhwm_is_scenario_peak"] = peak_reset
            s["vmhwm_since_start_mib"] = peak_so_far
            s["cpu"] = cpu
            scenarios[scenario.name] = s
            log(f"{scenario.name}: {report.fmt(s['tok_per_s'])} tok/s, p95 {report.fmt(s['latency_p95_s'], '.2f')} s, "
                f"{s['errors']} errors, {s['responses_503']} 503s, VmHWM {s['vmhwm_mib']:.0f} MiB")
            if not scenario.sampled:
                for o in load.outcomes:
                    if o.text is not None:
                        service_texts.setdefault(o.prompt, set()).add(o.text)
        final = svc.metrics()
        service["compiles_after_warmup"] = final.get("llm_compiles_after_warmup_total")
        service["generated_tokens_total"] = final.get("llm_generated_tokens_total")
        service["memory_at_end"] = svc.memory()
        service["vmhwm_since_start_mib"] = max(peak_so_far, service["memory_at_end"]["vmhwm_mib"])
    log("service stopped")
    return service, scenarios, service_texts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmark the text-generation service "
                                "against transformers' generate on TensorFlow (naive) and PyTorch.")
    p.add_argument("--preset", choices=("full", "tiny"), default="full",
                   help="full: DistilGPT2 shape, 64 tokens, 1/8/32 clients (default); tiny: a quick end-to-end check")
    p.add_argument("--model-dir", type=Path, help="model to serve (default: a random-weight model of the "
                   "preset's shape, made in the cache)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="models and converted weights")
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--torch-venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline (its bars read n/a)")
    p.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the service, e.g. MAX_BATCH_SIZE=8 (repeatable)")
    p.add_argument("--health-timeout", type=float, help="seconds to wait for /health ok "
                   "(default: 600 for full, 300 for tiny)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a bar does not hold")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    preset = config.make_preset(args.preset)
    started_at = time.strftime("%Y-%m-%d %H:%M:%S")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    work = args.results_dir / f"{stamp}-{preset.name}"
    work.mkdir(parents=True, exist_ok=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    revision = service_revision()  # before the run: the tree may change while it runs

    model_dir = ensure_model(args.model_dir, preset.model_shape, args.cache_dir).resolve()
    log(f"preset {preset.name}, model {model_dir}")

    torch_info = None
    if not args.no_torch:
        torch_info = ensure_venv(args.torch_venv, log=log)
        log(f"PyTorch venv ready: torch {torch_info['torch']}, {torch_info['threads']} threads"
            + (f" (created in {torch_info['install_seconds']:.0f} s)" if torch_info["created"] else ""))

    pt_dir = args.cache_dir / "pt" / weights_key(model_dir)
    tf_job = {"framework": "tf", "model_dir": str(model_dir), "runs": [r.job() for r in preset.tf_runs]}
    if torch_info and not (pt_dir / "model.safetensors").is_file():
        tf_job["convert_to"] = str(pt_dir)
    # The 1-minute load average as each phase starts: this machine may be shared, and a busy
    # neighbour shows here before it shows as a slow figure.
    phase_load = {"tf_baseline": round(os.getloadavg()[0], 2)}
    log("TensorFlow worker: naive eager generate, one request at a time")
    tf_out = run_worker(sys.executable, tf_job, work, "tf")
    baseline_raw = {f"tf:{r['name']}": r for r in tf_out["runs"]}
    if torch_info:
        phase_load["torch_baseline"] = round(os.getloadavg()[0], 2)
        log("PyTorch worker: generate at batch 1 and batch 8")
        pt_job = {"framework": "pt", "model_dir": str(model_dir), "weights_dir": str(pt_dir),
                  "runs": [r.job() for r in preset.torch_runs]}
        pt_out = run_worker(torch_info["python_path"], pt_job, work, "pt")
        torch_info["logits_check"] = pt_out["logits_check"]
        baseline_raw.update({f"pt:{r['name']}": r for r in pt_out["runs"]})

    phase_load["service"] = round(os.getloadavg()[0], 2)
    service_env = {**preset.service_env, **parse_env(args.service_env)}
    health_timeout = args.health_timeout or (600.0 if preset.name == "full" else 300.0)
    service, scenarios, service_texts = run_service(preset, model_dir, work, service_env, health_timeout, phase_load)

    baselines = {k: {**report.baseline_result(r, k.split(":")[0]), "texts": r["texts"]} for k, r in baseline_raw.items()}
    bars, ratios = report.compute_bars(scenarios, baselines, service)
    checks = report.consistency_checks(
        scenarios, baselines, {p: next(iter(t)) for p, t in service_texts.items() if len(t) == 1})
    checks["greedy_deterministic"] = {
        "prompts": len(service_texts), "same_text_every_request": sum(len(t) == 1 for t in service_texts.values())}
    result = {
        "preset": preset.name,
        "started_at": started_at,
        "machine": report.machine_facts(),
        "revision": revision,
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "load_at_phase_start": phase_load,
        "model": {"shape": preset.model_shape, **model_summary(model_dir)},
        "max_tokens": preset.max_tokens,
        "temperature": config.SAMPLING_TEMPERATURE,
        "tf": {"versions": tf_out["versions"]},
        "torch": torch_info,
        "service": service,
        "scenarios": scenarios,
        "baselines": {k: {kk: vv for kk, vv in v.items() if kk != "texts"} for k, v in baselines.items()},
        "bars": report.bars_as_dicts(bars),
        "ratios": ratios,
        "checks": checks,
    }
    md = report.markdown(result)
    (work / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    (work / "result.md").write_text(md)
    for name, src in (("latest.json", "result.json"), ("latest.md", "result.md")):
        shutil.copyfile(work / src, args.results_dir / name)
    print(md, flush=True)
    log(f"wrote {work / 'result.json'} and {work / 'result.md'} (also {args.results_dir}/latest.*)")
    if args.strict and any(b.holds is False for b in bars):
        return 1
    return 0
