"""Run the README's code blocks, as written, against a running bundle.

    python scripts/check_readme.py --port 8000 [--python .venv/bin/python] [--readme README.md]

`scripts/check_docker.sh` runs it once `docker compose up` is healthy. Each ```sh block runs in
bash with `set -euo pipefail`, each ```python block in the given Python (which needs the `openai`
client); the blocks call `localhost:8000` or `127.0.0.1:8000`, which is pointed at `--port` (the
check publishes on a free port). A block passes when it exits 0 and nothing it prints is an HTTP
error body. Output blocks (```json, ```text) are not run. Two blocks are not run here, each for
its reason in SKIPPED; every other block must be one of the runnable languages.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNABLE = {"sh", "python"}
OUTPUT = {"json", "text"}
SKIPPED = {
    "docker compose up": "starts the bundle: the check has already started it (`docker compose up --wait`)",
    "./scripts/test.sh": "the test command, which runs this check",
}
LOCAL = re.compile(r"\b(localhost|127\.0\.0\.1):8000\b")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)


@dataclass
class Block:
    lang: str
    code: str
    line: int

    @property
    def skipped(self) -> str | None:
        return SKIPPED.get(self.code.strip())


def blocks(text: str) -> list[Block]:
    found = []
    for m in FENCE.finditer(text):
        found.append(Block(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1))
    return found


def check_languages(found: list[Block]) -> list[str]:
    """Blocks that are neither runnable nor output: each needs a way to run, or to be output."""
    return [f"line {b.line}: a ```{b.lang or '(no language)'} block: use sh or python (run) or json or text (output)"
            for b in found if b.lang not in RUNNABLE | OUTPUT]


def error_bodies(output: str) -> list[str]:
    """Lines of output that are an HTTP error body (FastAPI's `detail`, OpenAI's `error`)."""
    bad = []
    for line in output.splitlines():
        payload = line.removeprefix("data: ").strip()
        try:
            value = json.loads(payload)
        except ValueError:
            continue
        if isinstance(value, dict) and ("detail" in value or "error" in value):
            bad.append(line)
    return bad


def run(block: Block, port: int, python: str, timeout: float) -> str | None:
    """None if the block ran clean, else why not."""
    code = LOCAL.sub(f"127.0.0.1:{port}", block.code)
    argv = ["bash", "-euo", "pipefail", "-c", code] if block.lang == "sh" else [python, "-c", code]
    # The bundle is on this machine: never through a proxy the environment names (curl and the
    # openai client both honour NO_PROXY).
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"did not finish in {timeout:.0f} s"
    if done.returncode != 0:
        return f"exit {done.returncode}: {(done.stderr or done.stdout)[-800:]}"
    if bad := error_bodies(done.stdout):
        return f"printed an error body: {bad[0][:300]}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="the port the bundle's API is published on")
    parser.add_argument("--python", default=sys.executable, help="a Python with the openai client")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a block may take")
    args = parser.parse_args(argv)

    found = blocks(args.readme.read_text())
    problems = check_languages(found)
    for block in found:
        if block.lang not in RUNNABLE:
            continue
        if block.skipped:
            print(f"check_readme: line {block.line}: `{block.code.strip()}` not run: {block.skipped}", file=sys.stderr)
            continue
        why = run(block, args.port, args.python, args.timeout)
        status = "ok" if why is None else f"FAILED: {why}"
        print(f"check_readme: line {block.line}: ```{block.lang} block: {status}", file=sys.stderr)
        if why is not None:
            problems.append(f"line {block.line}: {why}")
    for problem in problems:
        print(f"check_readme: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
