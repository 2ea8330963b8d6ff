#!/usr/bin/env bash
# The .venv of scripts/setup.sh plus the demo extras (gradio for python -m crformer.demo, Playwright for its
# browser test), exactly as requirements-demo.lock pins them: the packages it shares with requirements.lock
# are already installed at the same versions, so only the extras are added. Idempotent. Kept out of
# setup.sh so that README command 1 installs nothing for the demo. The browser test also needs Debian's
# chromium (apt-get install chromium; .ci/run installs it); Playwright never downloads a browser here.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/python -m pip install -q --no-deps -r requirements-demo.lock
.venv/bin/python -m pip check
