#!/usr/bin/env bash
# The main job (README): set up .venv if needed, then build a tiny SSE-H checkpoint and generate from it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
OUT=${1:-runs/tiny}
.venv/bin/sse-rl init-model --preset sse-h-tiny --out "$OUT/model" --tokenizer tiny --seed 0
.venv/bin/sse-rl generate --model "$OUT/model" --prompt "12 + 30 =" --max-new-tokens 16
