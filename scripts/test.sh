#!/usr/bin/env bash
# Install what the tests need into a virtual environment on Python 3.10, then run them.
#   ./scripts/test.sh            unit, engine, HTTP and benchmark tests, then the Docker checks
#   ./scripts/test.sh -k scheduler arguments after the script go to pytest (Docker checks skipped)
#   SKIP_DOCKER=1 ./scripts/test.sh   skip the Docker checks
#   SKIP_KUBERNETES=1 ./scripts/test.sh   skip rendering deploy/kubernetes/ (and fetching kubectl)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
python310() {
  # .python-version selects 3.10 through pyenv where pyenv is installed.
  if command -v pyenv >/dev/null 2>&1 && PYENV_VERSION=3.10.13 pyenv which python3.10 >/dev/null 2>&1; then
    PYENV_VERSION=3.10.13 pyenv which python3.10
  elif command -v python3.10 >/dev/null 2>&1; then
    command -v python3.10
  else
    echo "test.sh: Python 3.10 is required (pyenv install 3.10.13, or a python3.10 on PATH)" >&2
    exit 1
  fi
}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
  rm -rf "$VENV"
  "$(python310)" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat requirements.txt requirements-litert.txt requirements-nodeps.txt requirements-dev.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt -r requirements-dev.txt
  # tf-keras names `tensorflow` as a dependency; with it, pip would add a second TensorFlow.
  "$VENV/bin/python" -m pip install --quiet --no-deps -r requirements-nodeps.txt
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

# kubectl (with kustomize) for tests/test_kubernetes.py, pinned and cached under .cache/kubernetes/;
# kubernetes-validate, the other tool it uses, is in requirements-dev.txt.
if [ -z "${SKIP_KUBERNETES:-}" ]; then
  bash scripts/install_kubectl.sh
fi

# The KVAttention kernel (LiteRT's decode attention), built with the system's C compiler.
"$VENV/bin/python" -m service.engine.native.build >/dev/null

"$VENV/bin/python" -m pytest "$@"

if [ $# -eq 0 ] && [ -z "${SKIP_DOCKER:-}" ] && [ -f scripts/check_docker.sh ]; then
  bash scripts/check_docker.sh
fi
