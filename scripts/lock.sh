#!/usr/bin/env bash
# Refresh the two locks, from pyproject.toml's ranges plus scripts/lock.in, in one command:
# - requirements.lock: the exact set that scripts/setup.sh installs (README commands 1 and 2, CI), with
#   the dev extra;
# - requirements-demo.lock: that set plus the demo and demo-test extras (the web page and its browser
#   test), resolved with requirements.lock as constraints, so every package the two share keeps the main
#   lock's version and installing it on top (`pip install --no-deps -r requirements-demo.lock`, as
#   .ci/run does) only adds packages. Kept apart so that command 1 installs nothing for the demo.
# Resolved by pip-tools in a throw-away venv, for this interpreter (CPython 3.11, Linux x86_64).
# Refreshing is a deliberate change: run the whole suite on the new locks before committing them.
#   scripts/lock.sh                  # keep every pin that still satisfies the ranges
#   scripts/lock.sh --upgrade        # newest releases the ranges allow
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tool=$(mktemp -d)
trap 'rm -rf "$tool"' EXIT
"$PY" -m venv "$tool"
"$tool/bin/python" -m pip install -q "pip-tools==7.7.0" "setuptools>=77" wheel
# --no-build-isolation: the project's metadata is static (setup.py skips the extension without torch),
# so no build environment (and no torch download) is needed to read it.
compile=("$tool/bin/pip-compile" --quiet --extra dev --allow-unsafe --strip-extras
         --no-build-isolation --no-emit-index-url --no-emit-find-links --newline LF)
"${compile[@]}" --output-file requirements.lock "$@" pyproject.toml scripts/lock.in
echo "wrote requirements.lock ($(grep -c '==' requirements.lock) pins)"
# No --upgrade here: the constraints decide every shared pin, the rest keep theirs unless it is dropped.
"${compile[@]}" --extra demo --extra demo-test --constraint requirements.lock \
  --output-file requirements-demo.lock pyproject.toml scripts/lock.in
echo "wrote requirements-demo.lock ($(grep -c '==' requirements-demo.lock) pins)"
