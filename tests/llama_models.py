"""The Llama-family test models (tests/torch_reference.py), built once a session by the PyTorch
venv's python: PyTorch is a test-only dependency and never enters this venv (bench/torch_env.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "torch_reference.py"
# Every model directory the script writes: three models and two saves of them (bf16, sharded).
MODELS = ("llama", "llama-sp", "qwen2", "qwen2-bf16", "llama-sharded")


class BuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class LlamaModels:
    """The models' directories under `root` and transformers' results on them (reference.json:
    see tests/torch_reference.py)."""

    root: Path
    reference: dict

    def dir(self, name: str) -> Path:
        return self.root / name

    def ref(self, name: str) -> dict:
        return self.reference["models"][name]


def build(out: Path) -> LlamaModels:
    """Make (or check) the PyTorch venv and run the script into `out`; BuildError says what failed."""
    from bench.torch_env import TorchEnvError, ensure_venv

    try:
        python = ensure_venv(log=lambda message: print(message, file=sys.stderr))["python_path"]
    except (TorchEnvError, subprocess.CalledProcessError, OSError) as exc:
        raise BuildError(f"the PyTorch venv the Llama reference needs could not be made "
                         f"(bench/torch_env.py): {type(exc).__name__}: {exc}") from exc
    done = subprocess.run([python, str(SCRIPT), "--out", str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"{SCRIPT.name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return LlamaModels(out, json.loads((out / "reference.json").read_text()))
