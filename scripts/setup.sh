#!/usr/bin/env bash
# Create .venv (if missing) and install crformer with its compiled extension and test tools.
# Idempotent: a second run only rebuilds what changed. Honours CRFORMER_BUILD_CUDA=0|1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
# torch first: the extension is built against it (--no-build-isolation), see docs/DESIGN.md §3.
.venv/bin/python -m pip install -q torch
.venv/bin/python -m pip install -q --no-build-isolation -e ".[dev]"
.venv/bin/python -c "import crformer._C as c; print('crformer installed; extension CUDA kernels compiled in:', c.cuda_compiled())"
