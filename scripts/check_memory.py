"""Run the API image under a container memory limit and fill the context window with concurrent
requests: does the service hold its memory budget, answer every request, and stay up?

    python scripts/check_memory.py --image llm-service:check-litert --model-dir DIR \
        [--limit 1g] [--precision fp32|int8|auto] [--clients 8] [--batch-size 8] \
        [--prompt-tokens 16] [--env KEY=VALUE ...]

Each client sends one greedy request asking for the rest of the window (`max_tokens` = the
context window less its prompt), all at once. The container runs with `--memory` and
`--memory-swap` equal (no swap), the model directory mounted read-only, and the service's
defaults otherwise. Printed as one JSON line: statuses, the service's peak resident memory from
process start (VmHWM of PID 1) and after, OOM kill and restarts (docker inspect), wall time, the
budget the service logged, and its kv gauges once idle. Exits 1 when any request got a 5xx
other than 503, the container was OOM-killed or restarted. Needs a Docker engine
(scripts/check_docker.sh builds the image and starts one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT = (ROOT / "service" / "data" / "quality_text.txt").read_text()


def docker(*args: str, check: bool = True) -> str:
    return subprocess.run(["docker", *args], check=check, capture_output=True, text=True).stdout.strip()


def prompts(model_dir: Path, n: int, tokens: int) -> list[tuple[str, int]]:
    """n distinct prompts of about `tokens` tokens, each with the max_tokens that fills the window."""
    from service.engine.litert_gpt2 import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    window = json.loads((model_dir / "config.json").read_text())["n_positions"]
    words = TEXT.split()
    out = []
    for i in range(n):
        ids = tokenizer.encode(" ".join(words[i * 7:] + words), add_special_tokens=False).ids[:tokens]
        text = tokenizer.decode(ids)
        length = len(tokenizer.encode(text, add_special_tokens=False).ids) or 1
        out.append((text, window - length))
    return out


def status(name: str) -> dict[str, int]:
    lines = docker("exec", name, "cat", "/proc/1/status").splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {key: int(fields[key].split()[0]) // 1024 for key in ("VmHWM", "VmRSS")}


async def load(url: str, bodies: list[dict], timeout: float) -> tuple[list[int], float]:
    async with httpx.AsyncClient(timeout=timeout) as client:
        started = time.monotonic()

        async def one(body):
            return (await client.post(f"{url}/generate", json=body)).status_code

        codes = await asyncio.gather(*(one(b) for b in bodies), return_exceptions=True)
    return [c if isinstance(c, int) else repr(c) for c in codes], time.monotonic() - started


def wait_healthy(url: str, name: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if docker("inspect", "-f", "{{.State.Running}}", name, check=False) != "true":
            raise SystemExit(f"check_memory: the container stopped:\n{docker('logs', name, check=False)}")
        time.sleep(0.5)
    raise SystemExit("check_memory: /health never said ok")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", required=True)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--limit", default="1g")
    p.add_argument("--precision", default="auto")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--port", type=int, default=18123)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    name = f"check-memory-{uuid.uuid4().hex[:8]}"
    env = [f"LITERT_PRECISION={args.precision}", f"MAX_BATCH_SIZE={args.batch_size}",
           f"MAX_PROMPTS_PER_REQUEST={max(32, args.clients)}", f"MAX_QUEUE_SIZE={max(256, args.clients)}",
           *args.env]
    docker("run", "-d", "--name", name, "--memory", args.limit, "--memory-swap", args.limit,
           "-v", f"{args.model_dir.resolve()}:/models/model:ro", "-p", f"127.0.0.1:{args.port}:8000",
           *[x for e in env for x in ("-e", e)], args.image)
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_healthy(url, name)
        ready = status(name)
        bodies = [{"prompts": text, "max_tokens": max_tokens, "temperature": 0}
                  for text, max_tokens in prompts(args.model_dir, args.clients, args.prompt_tokens)]
        codes, seconds = asyncio.run(load(url, bodies, args.timeout))
        time.sleep(1)
        running = docker("inspect", "-f", "{{.State.Running}}", name) == "true"
        after = status(name) if running else {}
        inspect = json.loads(docker("inspect", name))[0]
        metrics = {}
        if running:
            for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
                if line.startswith(("llm_kv_", "llm_memory_", "llm_running_prompts", "llm_queue_prompts")):
                    key, value = line.rsplit(" ", 1)
                    metrics[key] = float(value)
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
        budget_line = next((line for line in (logs.stdout + logs.stderr).splitlines() if "memory: " in line), None)
        result = {"limit": args.limit, "precision": args.precision, "clients": args.clients,
                  "batch_size": args.batch_size, "prompt_tokens": args.prompt_tokens,
                  "statuses": {c: list(map(str, codes)).count(c) for c in sorted(set(map(str, codes)))},
                  "seconds": round(seconds, 1), "ready_rss_mib": ready["VmRSS"],
                  "peak_mib": after.get("VmHWM"), "rss_after_mib": after.get("VmRSS"),
                  "oom_killed": inspect["State"]["OOMKilled"], "restarts": inspect["RestartCount"],
                  "running": running, "budget_log": budget_line, "idle_gauges": metrics}
        print(json.dumps(result))
        bad = [c for c in codes if not isinstance(c, int) or (c >= 500 and c != 503)]
        return 1 if bad or result["oom_killed"] or not running or result["restarts"] else 0
    finally:
        docker("rm", "-f", name, check=False)


if __name__ == "__main__":
    sys.exit(main())
