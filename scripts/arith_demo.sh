#!/usr/bin/env bash
# The one-GPU learning demo (issue 8): SFT a small SSE-H on arithmetic word problems, evaluate it on the 500
# held-out problems, GRPO it, evaluate again. One stage per call, each under 10 minutes on one H100:
#   scripts/arith_demo.sh OUT tokenizer+sft   # tokenizer + random sse-h-small + ~4.5 min SFT -> OUT/sft/final
#   scripts/arith_demo.sh OUT eval-before     # held-out accuracy of OUT/sft/final -> OUT/eval_before
#   scripts/arith_demo.sh OUT grpo            # 40 GRPO steps (~10 s each; run it again to resume) -> OUT/grpo
#   scripts/arith_demo.sh OUT eval-after      # held-out accuracy of the GRPO policy -> OUT/eval_after
#   scripts/arith_demo.sh OUT report          # metrics, plots, eval reports, README -> bench/results/arith_demo/NAME
#   scripts/arith_demo.sh OUT replay          # issue 28: the grpo stage twice from OUT/sft/final, routes recorded,
#                                             # routing replay on and off -> OUT/grpo_replay_{on,off}, then
#                                             # bench/replay_report.py -> bench/results/mismatch/NAME
# The replay stage takes about twice the grpo stage: run it again to resume (an arm with final/ is done and skipped).
# Extra KEY=VALUE arguments after the stage override the recipe of the sft, grpo and replay stages, e.g.
#   scripts/arith_demo.sh OUT grpo model.dtype=float32 train.lr=1e-5
# Eval prompts are exactly the training prompts: the problem alone (--instruction ""), as a user turn of the chat
# template; sampled at temperature 1.0 (avg@4, what GRPO optimises).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/arith_demo.sh OUT tokenizer+sft|eval-before|grpo|eval-after|report|replay}
STAGE=${2:?usage: scripts/arith_demo.sh OUT tokenizer+sft|eval-before|grpo|eval-after|report|replay}
shift 2  # the rest: recipe overrides for the sft, grpo and replay stages
PY=.venv/bin/python                       # this repo's venv (scripts/setup_venv.sh), else the python on PATH
[[ -x $PY ]] || PY=$(command -v python3)
TEST="$OUT/data/arith_test.jsonl"
RESULTS="bench/results/arith_demo/$(basename "$OUT")"  # one folder per run

evaluate() {  # evaluate MODEL NAME: sampled (avg@4, temperature 1)
  "$PY" -m sse_rl.tasks.arithmetic --split test --out "$TEST"
  local common=(--model "$1" --data-file "$TEST" --instruction "" --max-tokens 128 --max-model-len 256
                --dtype bfloat16 --gpu-memory-utilization 0.5 --no-progress)
  "$PY" -m sse_rl.cli eval "${common[@]}" --samples 4 --temperature 1.0 --top-p 1.0 --out "$OUT/$2"
}

last_grpo_policy() {  # the HF policy folder of the GRPO run's newest checkpoint
  local ckpt
  ckpt=$(ls -d "$OUT"/grpo/checkpoints/step_[0-9][0-9][0-9][0-9][0-9][0-9] 2>/dev/null | sort | tail -n 1)
  [[ -n "$ckpt" ]] || { echo "no GRPO checkpoint under $OUT/grpo/checkpoints; run the grpo stage first" >&2; exit 1; }
  echo "$ckpt/model"
}

replay_runs() {  # the grpo stage with routes recorded, replay on then off (extra arguments: recipe overrides)
  local arm
  for arm in on off; do
    [[ -d "$OUT/grpo_replay_$arm/final" ]] && continue
    "$PY" -m sse_rl.cli train recipes/arith_grpo.yaml model.path="$OUT/sft/final" out_dir="$OUT/grpo_replay_$arm" \
      rollout.record_routes=true algo.routing_replay=$([[ $arm == on ]] && echo true || echo false) "$@"
  done
}

case "$STAGE" in
  tokenizer+sft) "$PY" -m sse_rl.cli sft recipes/arith_sft.yaml out_dir="$OUT/sft" "$@" ;;
  eval-before) evaluate "$OUT/sft/final" eval_before ;;
  grpo) "$PY" -m sse_rl.cli train recipes/arith_grpo.yaml model.path="$OUT/sft/final" out_dir="$OUT/grpo" "$@" ;;
  eval-after) evaluate "$(last_grpo_policy)" eval_after ;;
  report)
    mkdir -p "$RESULTS"
    cp "$OUT/sft/sft_metrics.jsonl" "$OUT/sft/sft_loss.png" "$OUT/sft/config.yaml" "$RESULTS/"
    cp "$OUT/grpo/metrics.jsonl" "$OUT/grpo/curves.png" "$RESULTS/"
    cp "$OUT/grpo/config.yaml" "$RESULTS/grpo_config.yaml"
    mv "$RESULTS/config.yaml" "$RESULTS/sft_config.yaml"
    for run in eval_before eval_after; do
      mkdir -p "$RESULTS/$run" && cp "$OUT/$run"/results.json "$OUT/$run"/summary.md "$RESULTS/$run/"
    done
    "$PY" -m sse_rl.cli eval --compare "$OUT/eval_before" "$OUT/eval_after" --out "$RESULTS/compare_sampled"
    {
      echo "# One-GPU learning demo: SFT, then GRPO, on arithmetic word problems (issue 8)"
      echo
      echo "Device: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || echo unknown)."
      echo "Commands: scripts/arith_demo.sh OUT {tokenizer+sft,eval-before,grpo,eval-after,report}."
      echo "Recipes: recipes/arith_sft.yaml (sft_config.yaml), recipes/arith_grpo.yaml (grpo_config.yaml)."
      echo "Held-out set: the 500 test problems of sse_rl/tasks/arithmetic.py (never in the train split)."
      echo
      echo "## Held-out accuracy before (SFT) and after GRPO, sampled at temperature 1.0 (avg@4)"
      cat "$RESULTS/compare_sampled/compare.md"
    } > "$RESULTS/README.md"
    echo "wrote $RESULTS" ;;
  replay) replay_runs "$@" && "$PY" -m bench.replay_report "$OUT" ;;
  *) echo "unknown stage $STAGE (tokenizer+sft, eval-before, grpo, eval-after, report, replay)" >&2; exit 2 ;;
esac
