"""The PyTorch baseline's venv (bench/.venv-torch): made on first use, checked every time.

torch is a benchmark-only dependency and never enters the service's venv. The venv uses
Python 3.11 because the CPU wheel of torch 2.13.0 that lies on this kind of machine's disk is
built for 3.11; bench/requirements-torch.txt pins it with its +cpu label so pip cannot fall
back to a multi-GB CUDA build from PyPI.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REQUIREMENTS = BENCH / "requirements-torch.txt"
DEFAULT_VENV = BENCH / ".venv-torch"
MARKER = "bench-requirements.sha256"
# Where this kind of machine keeps the torch wheel; pip finds it through PIP_FIND_LINKS,
# named here too in case an environment drops that variable.
LOCAL_WHEELS = "/opt/wheels"


class TorchEnvError(RuntimeError):
    pass


def find_python311() -> str:
    """BENCH_TORCH_PYTHON if set, else pyenv's newest 3.11, else a python3.11 on PATH."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = [os.environ.get("BENCH_TORCH_PYTHON")]
    candidates += sorted(glob.glob(f"{root}/versions/3.11*/bin/python3.11"), reverse=True)
    candidates.append(shutil.which("python3.11"))
    for cand in filter(None, candidates):
        try:
            out = subprocess.run([cand, "-c", "import sys; print(sys.version_info[:2] == (3, 11))"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "True":
            return cand
    raise TorchEnvError("no Python 3.11 found for the PyTorch baseline (set BENCH_TORCH_PYTHON)")


def ensure_venv(venv: Path = DEFAULT_VENV, log=print) -> dict:
    """Create or update the venv if its requirements changed; return facts for the report."""
    python = venv / "bin" / "python"
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    marker = venv / MARKER
    info: dict = {"venv": str(venv), "created": False, "install_seconds": None}
    if not (python.exists() and marker.exists() and marker.read_text().strip() == digest):
        log(f"creating the PyTorch baseline venv {venv} (about a minute)")
        start = time.monotonic()
        if not python.exists():
            subprocess.run([find_python311(), "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(REQUIREMENTS)]
        if not os.environ.get("PIP_FIND_LINKS") and Path(LOCAL_WHEELS).is_dir():
            pip += ["--find-links", LOCAL_WHEELS]
        subprocess.run(pip, check=True)
        marker.write_text(digest + "\n")
        info.update(created=True, install_seconds=time.monotonic() - start)
    probe = subprocess.run(
        [str(python), "-c",
         "import json, sys, torch, transformers; print(json.dumps({'python': sys.version.split()[0],"
         " 'torch': torch.__version__, 'cuda': torch.version.cuda, 'threads': torch.get_num_threads(),"
         " 'transformers': transformers.__version__}))"],
        capture_output=True, text=True,
    )
    if probe.returncode != 0:
        raise TorchEnvError(f"the PyTorch venv {venv} is broken:\n{probe.stderr[-2000:]}")
    facts = json.loads(probe.stdout.strip().splitlines()[-1])
    if facts["cuda"] is not None:
        raise TorchEnvError(f"{venv} holds a CUDA build of torch ({facts['torch']}); expected the CPU wheel")
    info.update(facts)
    info["python_path"] = str(python)
    return info
