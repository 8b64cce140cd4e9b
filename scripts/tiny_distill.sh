#!/usr/bin/env bash
# Distillation end to end on a CPU (minutes on 2 cores): train a tiny dense Transformer teacher with `sse-rl sft`
# (recipes/tiny_teacher_sft.yaml, Qwen3 shape, arithmetic word problems), then `sse-rl distill` it into an SSE-H
# student hybridized from it (recipes/tiny_distill_cpu.yaml: align, then logits). Prints the held-out KL at the
# logits stage's start and end and exits non-zero unless it fell by at least half. Run it again to resume.
#   bash scripts/tiny_distill.sh [OUT_DIR]     (default runs/tiny_distill)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
OUT=${1:-runs/tiny_distill}
if [ ! -d "$OUT/teacher/final" ]; then
    .venv/bin/sse-rl sft recipes/tiny_teacher_sft.yaml out_dir="$OUT/teacher"
fi
.venv/bin/sse-rl distill recipes/tiny_distill_cpu.yaml teacher.path="$OUT/teacher/final" out_dir="$OUT/distill"
.venv/bin/python - "$OUT/distill/distill_metrics.jsonl" <<'PY'
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
kl = [(r["step"], r["distill/eval_kl"]) for r in rows if r["stage"] == "logits" and "distill/eval_kl" in r]
(first_step, start), (last_step, end) = kl[0], kl[-1]
print(f"held-out KL(teacher || student): {start:.5f} at logits step {first_step} -> {end:.5f} at step {last_step} "
      f"({end / start:.2f}x)")
sys.exit(0 if end <= start / 2 else 1)
PY
