"""Run the API image under a container memory limit and fill the context window with concurrent
requests: does the service hold its memory budget, answer every request, and stay up?

    python scripts/check_memory.py --image llm-service:check-litert --model-dir DIR \
        [--limit 1g] [--precision fp32|int8|auto] [--clients 8] [--batch-size 8] \
        [--prompt-tokens 16] [--chat] [--max-tokens N] [--env KEY=VALUE ...]

Each client sends one greedy request, all at once: by default `POST /generate` with a prompt of
about `--prompt-tokens` tokens; with `--chat`, `POST /v1/chat/completions` with a short system
and user conversation of its own. Each asks for `--max-tokens` new tokens, or when that is not
given for the rest of the window: the window less the prompt's tokens, counted as the service
counts them (the tokenizer's special tokens for /generate; the model's chat template rendered,
then encoded without them, for chats). `--max-tokens 0` leaves max_tokens out (a chat then gets
the service's own default: the rest of the window within MAX_TOKENS_LIMIT). The window is
litert.json's `n_positions` capped by CONTEXT_TOKENS (from `--env`, else the service's default
of 2048), and MAX_TOKENS_LIMIT is raised to it unless `--env` sets it.

The container runs with `--memory` and `--memory-swap` equal (no swap), the model directory
mounted read-only, and the service's defaults otherwise. Printed as one JSON line: statuses and
one body per error status, the service's peak resident memory from process start (VmHWM of
PID 1) and after, the cgroup's peak (page cache included, as in the limit), OOM kill and
restarts (docker inspect), wall time, new tokens per chat answer, the budget the service logged,
and its kv gauges and new-token count once idle. If the container stops before it is ready, the
line says so, with the last memory figures seen and the log's last lines. Exits 1 when any
request got a 5xx other than 503, the container was OOM-killed, stopped or restarted.
Needs a Docker engine (scripts/check_docker.sh builds the image and starts one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT = (ROOT / "service" / "data" / "quality_text.txt").read_text()
DEFAULT_CONTEXT_TOKENS = 2048  # the service's CONTEXT_TOKENS default (service/config.py)
SYSTEM = "You are a helpful assistant. Answer the user's question at length."


def docker(*args: str, check: bool = True) -> str:
    return subprocess.run(["docker", *args], check=check, capture_output=True, text=True).stdout.strip()


def parse_env(pairs: list[str]) -> dict[str, str]:
    """`--env KEY=VALUE` arguments as a dict (a later KEY wins)."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"check_memory: --env wants KEY=VALUE, not {pair!r}")
        env[key] = value
    return env


def context_window(model_dir: Path, env: dict[str, str]) -> int:
    """The tokens a prompt and its answer span: the conversion's window, capped by CONTEXT_TOKENS
    as the engine caps it."""
    n_positions = int(json.loads((model_dir / "litert.json").read_text())["n_positions"])
    return min(n_positions, int(env.get("CONTEXT_TOKENS", DEFAULT_CONTEXT_TOKENS)))


def excerpts(tokenizer, n: int, tokens: int) -> list[str]:
    """n distinct passages of about `tokens` tokens from the quality text."""
    words = TEXT.split()
    return [tokenizer.decode(tokenizer.encode(" ".join(words[i * 7:] + words), add_special_tokens=False).ids[:tokens])
            for i in range(n)]


def max_tokens_for(window: int, prompt_tokens: int, max_tokens: int | None) -> int | None:
    """What a request asks for: `max_tokens` as given (0: left out, None), else the rest of the window."""
    if max_tokens is None:
        return window - prompt_tokens
    return max_tokens or None


def bodies(model_dir: Path, n: int, tokens: int, window: int, chat: bool, max_tokens: int | None,
           model: str = "model") -> list[dict]:
    """One greedy request body per client, with the max_tokens that fills the window unless given."""
    from service.chat_template import load_chat_template
    from service.engine.litert_gpt2 import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    out = []
    if not chat:
        for text in excerpts(tokenizer, n, tokens):
            length = len(tokenizer.encode(text).ids) or 1
            out.append({"prompts": text, "max_tokens": max_tokens_for(window, length, max_tokens), "temperature": 0})
    else:
        template = load_chat_template(model_dir)
        if template is None:
            raise SystemExit(f"check_memory: --chat: {model_dir} has no chat template")
        for i, text in enumerate(excerpts(tokenizer, n, tokens)):
            messages = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"Question {i + 1}: what comes after this passage? {text}"}]
            length = len(tokenizer.encode(template.render(messages), add_special_tokens=False).ids)
            out.append({"model": model, "messages": messages,
                        "max_tokens": max_tokens_for(window, length, max_tokens), "temperature": 0})
    return [{k: v for k, v in body.items() if v is not None} for body in out]


def status(name: str) -> dict[str, int]:
    lines = docker("exec", name, "cat", "/proc/1/status").splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {key: int(fields[key].split()[0]) // 1024 for key in ("VmHWM", "VmRSS")}


def cgroup_peak_mib(name: str) -> int | None:
    """The container's cgroup high-water mark (v2 memory.peak, v1 max_usage_in_bytes), page cache included."""
    out = docker("exec", name, "sh", "-c", "cat /sys/fs/cgroup/memory.peak 2>/dev/null || "
                 "cat /sys/fs/cgroup/memory/memory.max_usage_in_bytes", check=False)
    return int(out) // 2**20 if out.isdigit() else None


class Sampler(threading.Thread):
    """Reads PID 1's memory every half second, so the last figures are known if it is killed."""

    def __init__(self, name: str):
        super().__init__(daemon=True)
        self.container, self.last, self.stop = name, {}, threading.Event()

    def run(self):
        while not self.stop.wait(0.5):
            try:
                self.last = status(self.container)
            except (subprocess.CalledProcessError, ValueError, KeyError):
                pass


async def load(url: str, path: str, bodies: list[dict], timeout: float) -> tuple[list, float]:
    """Sends every body at once; each answer as (status, a chat's new tokens, else None; or an error's
    body), or the exception's repr."""
    async with httpx.AsyncClient(timeout=timeout) as client:
        started = time.monotonic()

        async def one(body):
            r = await client.post(f"{url}{path}", json=body)
            if r.status_code != 200:
                return r.status_code, r.text[:300]
            return r.status_code, None if path == "/generate" else r.json()["usage"]["completion_tokens"]

        answers = await asyncio.gather(*(one(b) for b in bodies), return_exceptions=True)
    return [a if isinstance(a, tuple) else repr(a) for a in answers], time.monotonic() - started


def wait_healthy(url: str, name: str, seconds: float = 300) -> str | None:
    """None once /health says ok; else why not (the container stopped, or the time ran out)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        if docker("inspect", "-f", "{{.State.Running}}", name, check=False) != "true":
            return "the container stopped before /health said ok"
        time.sleep(0.5)
    return "/health never said ok"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", required=True)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--limit", default="1g")
    p.add_argument("--precision", default="auto")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--chat", action="store_true", help="POST /v1/chat/completions instead of /generate")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="new tokens per request (default: the rest of the window; 0: leave max_tokens out)")
    p.add_argument("--port", type=int, default=18123)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.max_tokens is not None and args.max_tokens < 0:
        p.error("--max-tokens must be 0 or more")

    extra = parse_env(args.env)
    window = context_window(args.model_dir, extra)
    env = {"LITERT_PRECISION": args.precision, "MAX_BATCH_SIZE": str(args.batch_size),
           "MAX_PROMPTS_PER_REQUEST": str(max(32, args.clients)), "MAX_QUEUE_SIZE": str(max(256, args.clients)),
           # The rest of a window over the service's default limit (1,024) would be refused with 400.
           "MAX_TOKENS_LIMIT": str(max(1024, window)), **extra}
    path = "/v1/chat/completions" if args.chat else "/generate"
    requests = bodies(args.model_dir, args.clients, args.prompt_tokens, window, args.chat, args.max_tokens,
                      model=env.get("SERVED_MODEL_NAME", "model"))

    name = f"check-memory-{uuid.uuid4().hex[:8]}"
    docker("run", "-d", "--name", name, "--memory", args.limit, "--memory-swap", args.limit,
           "-v", f"{args.model_dir.resolve()}:/models/model:ro", "-p", f"127.0.0.1:{args.port}:8000",
           *[x for key, value in env.items() for x in ("-e", f"{key}={value}")], args.image)
    url = f"http://127.0.0.1:{args.port}"
    sampler = Sampler(name)
    sampler.start()
    result = {"limit": args.limit, "precision": args.precision, "clients": args.clients,
              "batch_size": args.batch_size, "mode": "chat" if args.chat else "generate", "window": window,
              "env": extra, "prompt_tokens": args.prompt_tokens,
              "max_tokens": sorted({b.get("max_tokens") for b in requests}, key=lambda m: (m is None, m))}
    try:
        failed = wait_healthy(url, name)
        if failed:
            inspect = json.loads(docker("inspect", name))[0]
            logs = subprocess.run(["docker", "logs", "--tail", "15", name], capture_output=True, text=True)
            result.update({"failed": failed, "oom_killed": inspect["State"]["OOMKilled"],
                           "exit_code": inspect["State"]["ExitCode"], "last_seen_mib": sampler.last,
                           "log_tail": (logs.stdout + logs.stderr).splitlines()[-15:]})
            print(json.dumps(result))
            return 1
        ready = status(name)
        answers, seconds = asyncio.run(load(url, path, requests, args.timeout))
        time.sleep(1)
        running = docker("inspect", "-f", "{{.State.Running}}", name) == "true"
        after = status(name) if running else {}
        inspect = json.loads(docker("inspect", name))[0]
        metrics = {}
        if running:
            for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
                if line.startswith(("llm_kv_", "llm_memory_", "llm_running_prompts", "llm_queue_prompts",
                                    "llm_generated_tokens_total")):
                    key, value = line.rsplit(" ", 1)
                    metrics[key] = float(value)
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
        budget_line = next((line for line in (logs.stdout + logs.stderr).splitlines() if "memory: " in line), None)
        codes = [a[0] if isinstance(a, tuple) else a for a in answers]
        tokens = [a[1] for a in answers if isinstance(a, tuple) and isinstance(a[1], int)]
        errors = {str(a[0]): a[1] for a in answers if isinstance(a, tuple) and a[0] != 200}
        result.update({
            "statuses": {c: list(map(str, codes)).count(c) for c in sorted(set(map(str, codes)))},
            "errors": errors or None,
            "completion_tokens": {"min": min(tokens), "max": max(tokens), "sum": sum(tokens)} if tokens else None,
            "seconds": round(seconds, 1), "ready_rss_mib": ready["VmRSS"],
            "peak_mib": after.get("VmHWM"), "rss_after_mib": after.get("VmRSS"),
            "last_seen_mib": None if running else sampler.last,
            "cgroup_peak_mib": cgroup_peak_mib(name) if running else None,
            "oom_killed": inspect["State"]["OOMKilled"], "restarts": inspect["RestartCount"],
            "running": running, "budget_log": budget_line, "idle_gauges": metrics})
        print(json.dumps(result))
        bad = [c for c in codes if not isinstance(c, int) or (c >= 500 and c != 503)]
        return 1 if bad or result["oom_killed"] or not running or result["restarts"] else 0
    finally:
        sampler.stop.set()
        docker("rm", "-f", name, check=False)


if __name__ == "__main__":
    sys.exit(main())
