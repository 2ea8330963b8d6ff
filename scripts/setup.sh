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
# --no-compile, then compileall over all cores: pip byte-compiles the ≈ 6 GB set one file after another
# (98 s of a 109 s set-up on a 2-core machine); unpacking alone takes ≈ 40 s and the parallel compile ≈ 20 s.
# The .pyc files are the same (timestamp-checked) ones pip writes. Some packages ship files that are not
# Python 3.11 (torch: one 3.12-only test helper); pip skips such files silently, so -qq and `|| :` here.
.venv/bin/python -m pip install -q --no-compile --no-deps -r requirements.lock
.venv/bin/python -m compileall -qq -j 0 "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || :
# --no-build-isolation: the extension is built against the torch just installed (docs/DESIGN.md §3);
# --no-deps: nothing beyond the lock.
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
.venv/bin/python -m pip check
.venv/bin/python -c "import crformer._C as c; print('crformer installed; extension CUDA kernels compiled in:', c.cuda_compiled())"
