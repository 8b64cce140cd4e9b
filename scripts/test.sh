#!/usr/bin/env bash
# The test command (README and .ci/run): set up .venv if needed, lint, run the whole CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
.venv/bin/ruff check sse_rl models rewards eval tests bench
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
