"""llama.cpp's llama-server as a standing peer of the service (issue 21): source, build, weights, serving.

- Source: the sdist of llama-cpp-python LLAMA_CPP_PYTHON, which vendors llama.cpp (commit
  LLAMA_CPP_COMMIT) under vendor/llama.cpp, fetched with pip (PyPI is the one registry this
  project's machines reach) and unpacked into the cache: <cache>/llamacpp/.
- Build: cmake and ninja, llama-server alone, static, CPU only, tuned for this CPU (GGML_NATIVE);
  about 9 minutes on 2 cores. The binary stays in the cache; a run includes the peer by default
  once it is there (`python -m bench --build-peers` builds it).
- Weights: the same random weights as the service's, written as GGUF by llama.cpp's own
  convert_hf_to_gguf.py (bench/gguf_convert.py, in the PyTorch venv): q8_0 (int8 blocks of 32
  with an fp16 scale each) beside the service's int8, f32 beside its fp32. GPT-2's come from the
  safetensors the TensorFlow worker writes for PyTorch; the Llama family's are the model's own.
- Serving: `llama-server` with as many slots as the service batches rows and the same context
  per slot as the service serves; each scenario's /generate bodies become /completion bodies
  asking for the same work (`completion_body`), streamed, and read into the same StreamOutcome
  as the service's answers (`stream_completion`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.client import StreamOutcome, stream_events
from bench.server import ServerProcess, parse_metrics

LLAMA_CPP_PYTHON = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e570"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
SERVER = "llama-server"

# The GGUF weight types the peer serves (config.LLAMACPP_WEIGHTS: which beside which backend).
OUTTYPES = ("q8_0", "f32")

# The model files the converter reads besides config.json and the weights (those a model has).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "generation_config.json")

# llama-server's stop_type, as the service's finish_reason names it.
FINISH_REASONS = {"limit": "length", "eos": "eos_token", "word": "stop_sequence"}

# llama-server (its cpp-httplib) closes the connection after a streamed answer although it
# answers `Keep-Alive: timeout=5, max=100`; a client that sends its next request on that
# connection before the close arrives gets no answer ("Server disconnected without sending a
# response": 5 of 300 back-to-back requests from 2 clients, seen here). Each request therefore
# asks for a connection of its own, which is what the server gives it anyway.
CLOSE = {"Connection": "close"}

# The peer's Prometheus counters under the service's names, where they count the same thing.
METRIC_NAMES = {"llamacpp:tokens_predicted_total": "llm_generated_tokens_total"}


class PeerError(RuntimeError):
    """The peer could not be fetched, built, converted or served."""


@dataclass(frozen=True)
class Layout:
    """Where the peer lives in the cache. Every path is resolved: ninja reconfigures without end
    when the source is reached through a symlink (bench/.cache may be one)."""

    root: Path

    @classmethod
    def of(cls, cache: Path) -> "Layout":
        return cls(Path(os.path.realpath(cache / "llamacpp")))

    @property
    def src(self) -> Path:
        return self.root / SDIST / "vendor" / "llama.cpp"

    @property
    def build(self) -> Path:
        return self.root / "build"

    @property
    def binary(self) -> Path:
        return self.build / "bin" / SERVER

    @property
    def gguf(self) -> Path:
        return self.root / "gguf"


def built(cache: Path) -> Path | None:
    """The cached llama-server, or None when it has not been built."""
    binary = Layout.of(cache).binary
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def configure_command(src: Path, build: Path) -> list[str]:
    """cmake's configure step: llama-server only, static, Release, for this CPU, no TLS or web UI."""
    return ["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]


def build_command(build: Path, jobs: int) -> list[str]:
    return ["cmake", "--build", str(build), "--target", SERVER, f"-j{jobs}"]


def fetch_source(layout: Layout, log) -> None:
    """The llama-cpp-python sdist from PyPI, unpacked into the cache (its vendored llama.cpp is the source)."""
    if layout.src.is_dir():
        return
    log(f"fetching llama-cpp-python {LLAMA_CPP_PYTHON}'s sdist (llama.cpp {LLAMA_CPP_COMMIT}) with pip")
    layout.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=layout.root) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--no-binary", ":all:", "--no-deps", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp],
                       check=True)
        archive = Path(tmp) / f"{SDIST}.tar.gz"
        with tarfile.open(archive) as tar:
            # The "data" filter refuses links and paths that leave the folder (PEP 706).
            tar.extractall(tmp, filter="data")
        shutil.rmtree(layout.root / SDIST, ignore_errors=True)
        (Path(tmp) / SDIST).rename(layout.root / SDIST)
    if not layout.src.is_dir():
        raise PeerError(f"the sdist holds no vendor/llama.cpp: {layout.root / SDIST}")


def build_server(cache: Path, log, jobs: int | None = None) -> Path:
    """Fetch the source if needed and build llama-server into the cache; its path. The build's
    output goes to <cache>/llamacpp/build.log."""
    layout = Layout.of(cache)
    fetch_source(layout, log)
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise PeerError(f"building llama-server needs {tool} (pip install {tool}, or apt-get install "
                            f"{'cmake' if tool == 'cmake' else 'ninja-build'})")
    jobs = jobs or len(os.sched_getaffinity(0))
    build_log = layout.root / "build.log"
    log(f"building {SERVER} in {layout.build} with {jobs} jobs (about 9 minutes on 2 cores); output in {build_log}")
    start = time.monotonic()
    with build_log.open("w") as out:
        for cmd in (configure_command(layout.src, layout.build), build_command(layout.build, jobs)):
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                tail = "\n".join(build_log.read_text(errors="replace").splitlines()[-20:])
                raise PeerError(f"{' '.join(cmd[:2])} failed; {build_log}:\n{tail}")
    binary = built(cache)
    if binary is None:
        raise PeerError(f"the build ended without {layout.binary}")
    log(f"{SERVER} built in {time.monotonic() - start:.0f} s")
    return binary


def server_version(binary: Path) -> str:
    """`llama-server --version`'s first line that names the build (it prints to stderr)."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("version")]
    return lines[0] if lines else "unknown"


def weights_key(model_dir: Path, weights: Path) -> str:
    """Names the GGUF files of exactly these weights (the model's path, the weights' size and mtime)."""
    st = weights.stat()
    ident = f"{model_dir.resolve()}|{weights.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def stage_model(model_dir: Path, weights: Path, out: Path) -> Path:
    """A directory the converter can read: links to the model's tokenizer files and `weights`
    (as model.safetensors), and its config.json. GPT-2's gains `n_ctx`, which the converter
    reads and current transformers no longer writes: the same value as n_positions."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            (out / name).symlink_to((model_dir / name).resolve())
    (out / "model.safetensors").symlink_to(weights.resolve())
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") == "gpt2" and "n_ctx" not in cfg:
        cfg["n_ctx"] = cfg["n_positions"]
    (out / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    return out


def ensure_gguf(model_dir: Path, weights: Path, outtype: str, cache: Path, torch_python: str, log) -> dict:
    """The model's GGUF file of `outtype` (f32 or q8_0), converted into the cache if absent:
    its path, size, and the conversion's time (None when cached)."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: one of {', '.join(OUTTYPES)}")
    layout = Layout.of(cache)
    folder = layout.gguf / weights_key(model_dir, weights)
    path = folder / f"model-{outtype}.gguf"
    seconds = None
    if not path.is_file():
        fetch_source(layout, log)  # the converter is the source's (a minute's download, no build)
        staged = stage_model(model_dir, weights, folder / "hf")
        tmp = path.with_suffix(".tmp")
        conv_log = folder / f"convert-{outtype}.log"
        log(f"llama.cpp: converting {model_dir.name} to {outtype} GGUF ({conv_log})")
        start = time.monotonic()
        cmd = [torch_python, "-m", "bench.gguf_convert", str(layout.src), str(staged), str(tmp), outtype]
        repo = Path(__file__).resolve().parent.parent
        with conv_log.open("w") as out:
            proc = subprocess.run(cmd, cwd=repo, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONPATH": str(repo)})
        if proc.returncode != 0 or not tmp.is_file():
            tail = "\n".join(conv_log.read_text(errors="replace").splitlines()[-15:])
            raise PeerError(f"GGUF conversion to {outtype} failed ({proc.returncode}); {conv_log}:\n{tail}")
        tmp.rename(path)
        seconds = time.monotonic() - start
        log(f"llama.cpp: {path.name} written in {seconds:.0f} s")
    return {"outtype": outtype, "path": str(path), "mib": path.stat().st_size / 2**20, "convert_seconds": seconds}


@dataclass(frozen=True)
class ServerSettings:
    """llama-server's share of the machine: `threads` for every step, `parallel` slots (the rows
    one decode call may hold), `slot_context` tokens each (prompt and answer together)."""

    threads: int
    parallel: int
    slot_context: int

    @property
    def context(self) -> int:
        return self.parallel * self.slot_context


def server_command(binary: Path, gguf: Path, port: int, settings: ServerSettings) -> list[str]:
    """llama-server on the loopback interface. Slots share one context of parallel × slot_context
    tokens, each capped at slot_context. `--cache-ram 0`: no host-memory cache of finished
    prompts, which the service does not have either and which the requests never reuse
    (cache_prompt false). `--metrics`: /metrics, for the generated tokens."""
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(settings.threads), "--parallel", str(settings.parallel), "-c", str(settings.context),
            "--cache-ram", "0", "--metrics"]


class LlamaServer(ServerProcess):
    """llama-server serving one GGUF file; memory and CPU read as the service's are."""

    name = SERVER

    def __init__(self, binary: Path, gguf: Path, settings: ServerSettings, log_path: Path,
                 health_timeout: float = 600.0):
        super().__init__(log_path, health_timeout, cwd=binary.parent)
        self.binary, self.gguf, self.settings = binary, gguf, settings

    def command(self) -> list[str]:
        return server_command(self.binary, self.gguf, self.port, self.settings)

    def metrics(self) -> dict[str, float]:
        """/metrics with the counters that count what the service's do under the service's names."""
        return peer_metrics(parse_metrics(self.metrics_text()))


def peer_metrics(values: dict[str, float]) -> dict[str, float]:
    return {**values, **{ours: values[theirs] for theirs, ours in METRIC_NAMES.items() if theirs in values}}


def completion_body(body: dict) -> dict:
    """One-prompt /generate `body` as a /completion body asking llama-server for the same work:
    the prompt, exactly max_tokens new tokens (ignore_eos), greedy at temperature 0 or sampled
    with the same temperature, top_k, top_p and seed, streamed. llama.cpp's other samplers are
    off: min_p (0.05 by default) set to 0, the rest off by default (repeat, DRY, XTC, typical).
    cache_prompt false: every prompt is evaluated in full, as the service evaluates it."""
    if len(body["prompts"]) != 1:
        raise ValueError("the peer takes one prompt per request")
    out = {"prompt": body["prompts"][0], "n_predict": body["max_tokens"],
           "temperature": body.get("temperature", 0.0), "top_k": body.get("top_k", 0),
           "top_p": body.get("top_p", 1.0), "min_p": 0.0, "ignore_eos": True, "cache_prompt": False,
           "stream": True}
    if body.get("seed") is not None:
        out["seed"] = body["seed"]
    return out


def parse_completion_event(line: str, outcome: StreamOutcome, elapsed: float) -> bool:
    """Apply one `data:` line of llama-server's /completion stream, read `elapsed` seconds after
    the first attempt; True once the final event (`"stop": true`) is in. Its counts are the
    server's: tokens_predicted (generated) and tokens_evaluated (the prompt). ValueError on a
    malformed event or an error event."""
    event = json.loads(line[len("data:"):].strip())
    if not isinstance(event, dict):
        raise ValueError(f"unexpected event {line[:100]!r}")
    if "error" in event:
        raise ValueError(f"the server failed mid-stream: {event['error']}"[:300])
    if not isinstance(event.get("content"), str) or not isinstance(event.get("stop"), bool):
        raise ValueError(f"unexpected event {line[:100]!r}")
    if outcome.finish_reason is not None:
        raise ValueError(f"event after the final one: {line[:100]!r}")
    outcome.add_piece(event["content"], elapsed)
    if not event["stop"]:
        return False
    stop_type = event.get("stop_type")
    outcome.finish(FINISH_REASONS.get(stop_type, stop_type or "unknown"), event.get("tokens_evaluated"),
                   event.get("tokens_predicted"), elapsed, line, "tokens_predicted")
    return True


async def stream_completion(client: httpx.AsyncClient, body: dict, on_first_piece=None) -> StreamOutcome:
    """`body` (a /generate body, one prompt) sent to llama-server's /completion, streamed, into a
    StreamOutcome as bench/client.py's stream_request reads the service's: the stream is complete
    when the final event has come and the server has closed it. A 503 (no slot can take it) is
    waited out and sent again, as the service's."""
    outcome = StreamOutcome(prompt=body["prompts"][0], max_tokens=body["max_tokens"])
    read = functools.partial(_read_completion, on_first_piece=on_first_piece)
    return await stream_events(client, "/completion", completion_body(body), outcome, read, headers=CLOSE)


async def _read_completion(r: httpx.Response, outcome: StreamOutcome, start: float, on_first_piece) -> None:
    final = False
    try:
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            if line[len("data:"):].strip() == "[DONE]":  # the OpenAI-style endpoints' end; /completion has none
                break
            had_piece = outcome.first_piece is not None
            final = parse_completion_event(line, outcome, time.perf_counter() - start) or final
            if not had_piece and outcome.first_piece is not None and on_first_piece is not None:
                on_first_piece()
    except ValueError as exc:
        outcome.error = f"bad stream: {exc}"
        return
    if not final:
        outcome.error = "the stream ended without its final event"
        return
    outcome.latency = time.perf_counter() - start
