#!/usr/bin/env bash
# Create .venv (if missing) and install exactly requirements.lock (the tested set, torch included),
# then crformer itself, editable, with its compiled extension. Idempotent: a second run only rebuilds
# what changed. Honours CRFORMER_BUILD_CUDA=0|1. The lock is refreshed by scripts/lock.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -c 'import sys; sys.version_info[:2] == (3, 11) or print(
    f"setup.sh: requirements.lock was resolved for CPython 3.11; this is {sys.version.split()[0]}", file=sys.stderr)'
# pip first (the lock's pip reads the lock), then every pinned package with no resolution left to do.
.venv/bin/python -m pip install -q "$(grep -m1 '^pip==' requirements.lock)"
# pip unpacks one wheel after another on one core, and byte-compiles one file after another: so the lock
# goes in as two halves at once, with --no-compile — the CUDA runtime wheels (nvidia-*, cuda-*, triton:
# ≈ 4 GB of shared libraries, ≈ 27 s alone on a 2-core machine) beside the rest (≈ 19 s) — and compileall
# byte-compiles on all cores: the rest's folders as soon as they are in (while the runtime still unpacks),
# the runtime's while this package's extension builds (it needs the whole set: importing torch loads the
# runtime). The whole set-up took 76–78 s with one compile after both halves against 114–119 s with one
# serial pip (fresh clones, 2 cores, back to back). The .pyc files are the same (timestamp-checked) ones
# pip writes. Some packages ship files that are not Python 3.11 (torch: one 3.12-only test helper); pip
# skips such files silently, so -qq and `|| :`.
CUDA_RUNTIME='^(nvidia-|cuda-|triton==)'
PURELIB=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
RUNTIME_DIRS=(nvidia cuda triton)  # where the runtime wheels put their Python files
.venv/bin/python -m pip install -q --no-compile --no-deps -r <(grep -E "$CUDA_RUNTIME" requirements.lock) &
runtime=$!
.venv/bin/python -m pip install -q --no-compile --no-deps -r <(grep -vE "$CUDA_RUNTIME" requirements.lock)
RUNTIME_RX=$(.venv/bin/python -c 'import re, sys; print("^" + re.escape(sys.argv[1]) + "/(" + "|".join(sys.argv[2:]) + ")/")' \
  "$PURELIB" "${RUNTIME_DIRS[@]}")
.venv/bin/python -m compileall -qq -j 0 -x "$RUNTIME_RX" "$PURELIB" &
compile_rest=$!
wait "$runtime"
.venv/bin/python -m compileall -qq -j 0 "${RUNTIME_DIRS[@]/#/$PURELIB/}" &
compile_runtime=$!
# --no-build-isolation: the extension is built against the torch just installed (docs/DESIGN.md §3);
# --no-deps: nothing beyond the lock.
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
wait "$compile_rest" || :
wait "$compile_runtime" || :
.venv/bin/python -m pip check
.venv/bin/python -c "import crformer._C as c; print('crformer installed; extension CUDA kernels compiled in:', c.cuda_compiled())"
