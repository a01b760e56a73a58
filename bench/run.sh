#!/usr/bin/env bash
# The benchmark, in the service's venv (.venv, made by scripts/test.sh); arguments go to
# `python -m bench` (--help lists them). The PyTorch baseline's venv is made on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m bench "$@"
