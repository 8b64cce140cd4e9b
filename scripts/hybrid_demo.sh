#!/usr/bin/env bash
# The one-GPU conversion demo (issue 23): a Transformer teacher -> SSE-H by hybridize + distill -> GRPO, on the
# arithmetic word problems (sse_rl/tasks/arithmetic.py), each model evaluated on the 500 held-out problems.
#   scripts/hybrid_demo.sh OUT teacher     # sse-rl sft: Qwen3-shaped 97M Transformer, clean solutions -> OUT/teacher
#   scripts/hybrid_demo.sh OUT hybridize   # sse-rl hybridize, attention kept at 4 of 14 layers -> OUT/hybrid; which 4:
#                                          # ATTN_LAYERS (default auto:4, the 4 whose attention reaches furthest on
#                                          # 64 training problems; "3,7,10,13" = the evenly spaced run of 2026-12-07)
#   scripts/hybrid_demo.sh OUT distill     # sse-rl distill: align, then logits -> OUT/distill/{align,logits,final}
#   scripts/hybrid_demo.sh OUT random      # the same SSE-H shape from random weights, SFT on as many tokens as
#                                          # both distillation stages together -> OUT/random/final
#   scripts/hybrid_demo.sh OUT grpo        # 40 GRPO steps from the distilled hybrid -> OUT/grpo
#   scripts/hybrid_demo.sh OUT eval NAME   # held-out avg@4 of one of: teacher hybrid align logits random grpo
#   scripts/hybrid_demo.sh OUT all         # every stage and eval in two lanes that share the GPU (the teacher, then
#                                          # hybridize and distill; beside them each eval as soon as its checkpoint
#                                          # exists and the random-init SFT), then GRPO alone; skips what is done
#   scripts/hybrid_demo.sh OUT steps STEP.. # the named steps (teacher eval_teacher hybridize ...) one after another
# GRPO's held-out numbers come from its own evals (the same 500 problems, avg@4 at temperature 1, steps 0/20/40).
#   scripts/hybrid_demo.sh OUT report      # tables, curves, completions and their errors by kind
#                                          # (bench/arith_errors.py) -> bench/results/hybrid_demo/NAME
#   scripts/hybrid_demo.sh OUT pack FILE   # OUT without weights, checkpoints and data -> FILE (.tar.gz): what a
#                                          # device machine can send back mid-run; `report` works on it unpacked
# DISTILL_SCALE=3 scripts/hybrid_demo.sh OUT all: both distillation stages and the random-init SFT on 3x the tokens
#   (to reuse a run's teacher and hybrid: mkdir OUT3; ln -s OUT/teacher OUT/hybrid OUT3/; a step whose output exists
#   is skipped)
# DISTILL_BATCH=2048 scripts/hybrid_demo.sh OUT all: the same tokens in distillation steps of 2,048 (and the
#   random-init SFT's); steps, warm-up and held-out intervals scale with it
# Evaluation as in scripts/arith_demo.sh: the problem alone as a user turn, avg@4 at temperature 1.0.
set -euo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."
usage="usage: scripts/hybrid_demo.sh OUT teacher|hybridize|distill|random|grpo|eval NAME|all|steps STEP..|report|pack FILE"
OUT=${1:?$usage}
STAGE=${2:?$usage}
PY=.venv/bin/python
[[ -x $PY ]] || PY=$(command -v python3)
ATTN_LAYERS=${ATTN_LAYERS:-auto:4}       # about 1 in 4 of the teacher's 14 layers
TEST="$OUT/data/arith_test.jsonl"
RESULTS="bench/results/hybrid_demo/$(basename "$OUT")"
EVAL_GPU_UTIL=${EVAL_GPU_UTIL:-0.15}      # an eval engine's share of the GPU, leaving room for the training lane
DISTILL_SCALE=${DISTILL_SCALE:-1}         # multiplies both distillation stages' steps (and the random-init SFT's):
                                          # 1 = the recipe's 9.3 % of the teacher's tokens, 3 = 28 %, 10 = 93 %
DISTILL_BATCH=${DISTILL_BATCH:-}          # tokens per distillation step; empty: the recipe's train.batch_tokens
sse() { "$PY" -m sse_rl.cli "$@"; }
timed() {  # timed NAME COMMAND...: run it, append its wall seconds to OUT/stage_seconds.tsv
  local name=$1 start=$SECONDS
  shift
  "$@"
  printf '%s\t%s\n' "$name" "$((SECONDS - start))" >> "$OUT/stage_seconds.tsv"
}

model_of() {  # the checkpoint behind an eval name
  case "$1" in
    teacher) echo "$OUT/teacher/final" ;;
    hybrid) echo "$OUT/hybrid" ;;
    align) echo "$OUT/distill/align/final" ;;
    logits) echo "$OUT/distill/final" ;;
    random) echo "$OUT/random/final" ;;
    grpo) ls -d "$OUT"/grpo/checkpoints/step_[0-9]*/model | sort | tail -n 1 ;;
    *) echo "unknown eval name $1" >&2; exit 2 ;;
  esac
}

evaluate() {  # evaluate NAME: sampled avg@4 at temperature 1 on the 500 held-out problems -> OUT/eval_NAME
  mkdir -p "$OUT/data"
  "$PY" -m sse_rl.tasks.arithmetic --split test --out "$TEST"
  sse eval --model "$(model_of "$1")" --data-file "$TEST" --instruction "" --max-tokens 128 --max-model-len 256 \
    --dtype bfloat16 --gpu-memory-utilization "$EVAL_GPU_UTIL" --enforce-eager --no-progress --samples 4 --temperature 1.0 --top-p 1.0 \
    --out "$OUT/eval_$1"
}

recipe_value() {  # recipe_value KEY.PATH: one value of recipes/arith_distill.yaml
  "$PY" -c 'import functools, sys, yaml
print(functools.reduce(lambda v, k: v[k], sys.argv[2].split("."), yaml.safe_load(open(sys.argv[1]))))' \
    recipes/arith_distill.yaml "$1"
}

distill_batch() {  # tokens per optimizer step of the distillation: DISTILL_BATCH, else the recipe's
  echo "${DISTILL_BATCH:-$(recipe_value train.batch_tokens)}"
}

rebatched() {  # rebatched N: N of the recipe's steps as steps of distill_batch tokens (the same tokens)
  echo $(( $1 * $(recipe_value train.batch_tokens) / $(distill_batch) ))
}

stage_steps() {  # stage_steps STAGE: the recipe's steps for one distillation stage, rebatched, times DISTILL_SCALE
  echo $(( $(rebatched "$(recipe_value "$1.steps")") * DISTILL_SCALE ))
}

micro_batch() {  # tokens per forward: the recipe's token_budget, at most one step's tokens
  local batch budget
  batch=$(distill_batch)
  budget=$(recipe_value train.token_budget)
  echo $(( batch < budget ? batch : budget ))
}

max_rows() {  # training problems to tokenize: ~17k are read per DISTILL_SCALE unit, at most the 200k there are
  local rows=$(( 20000 * DISTILL_SCALE ))
  echo $(( rows < 200000 ? rows : 200000 ))
}

distill_tokens() {  # token budget of both distillation stages (steps x batch_tokens)
  echo $(( ($(stage_steps align) + $(stage_steps logits)) * $(distill_batch) ))
}

calibration() {  # 64 training problems with their solutions, as the chat template renders them -> OUT/data
  mkdir -p "$OUT/data"
  "$PY" - "$OUT/teacher/final" "$OUT/data/calibration.jsonl" <<'PY'
import json, sys
from transformers import AutoTokenizer
from sse_rl.tasks.arithmetic import make_rows
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
with open(sys.argv[2], "w") as f:
    for row in make_rows("train")[:64]:
        chat = [{"role": "user", "content": row["problem"]}, {"role": "assistant", "content": row["solution"]}]
        f.write(json.dumps({"text": tokenizer.apply_chat_template(chat, tokenize=False)}) + "\n")
PY
}

random_init() {  # random weights of the hybrid's shape (its attention layers too), with its tokenizer -> OUT/random_init
  "$PY" - "$OUT/hybrid" "$OUT/random_init" <<'PY'
import sys, torch
from transformers import AutoTokenizer
from sse_rl.models import SSEHConfig, SSEHForCausalLM
torch.manual_seed(0)
SSEHForCausalLM(SSEHConfig.from_pretrained(sys.argv[1])).save_pretrained(sys.argv[2])
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
PY
}

run_stage() {
  case "$1" in
    teacher) sse sft recipes/arith_teacher_sft.yaml out_dir="$OUT/teacher" ;;
    hybridize)
      calibration
      sse hybridize "$OUT/teacher/final" "$OUT/hybrid" --attn-layers "$ATTN_LAYERS" \
        --calibration "$OUT/data/calibration.jsonl" ;;
    distill) sse distill recipes/arith_distill.yaml teacher.path="$OUT/teacher/final" student.path="$OUT/hybrid" \
               out_dir="$OUT/distill" align.steps="$(stage_steps align)" logits.steps="$(stage_steps logits)" \
               align.warmup_steps="$(rebatched "$(recipe_value align.warmup_steps)")" \
               logits.warmup_steps="$(rebatched "$(recipe_value logits.warmup_steps)")" \
               run.eval_steps="$(rebatched "$(recipe_value run.eval_steps)")" \
               run.logging_steps="$(rebatched "$(recipe_value run.logging_steps)")" \
               train.batch_tokens="$(distill_batch)" train.token_budget="$(micro_batch)" data.max_rows="$(max_rows)" ;;
    random)
      [[ -d "$OUT/random_init" ]] || random_init
      # the distillation's tokens in steps of the distillation's size: the comparison is of the start, not the steps
      local batch steps
      batch=$(distill_batch)
      steps=$(( ($(distill_tokens) + batch - 1) / batch ))
      sse sft recipes/arith_sft.yaml model.path="$OUT/random_init" data.train=sse_rl.tasks.arithmetic:rows \
        data.max_rows="$(max_rows)" train.steps="$steps" train.warmup_steps=$(( steps / 10 )) \
        train.token_budget="$batch" train.batch_tokens="$batch" out_dir="$OUT/random" ;;
    grpo) sse train recipes/arith_grpo.yaml model.path="$OUT/distill/final" out_dir="$OUT/grpo" eval.every=20 ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
}

done_marker() {  # the file a finished stage or eval leaves
  case "$1" in
    teacher|random) echo "$OUT/$1/final/config.json" ;;
    hybridize) echo "$OUT/hybrid/config.json" ;;
    distill) echo "$OUT/distill/final/config.json" ;;
    grpo) echo "$OUT/grpo/checkpoints/step_000040/model/config.json" ;;
    eval_*) echo "$OUT/$1/results.json" ;;
  esac
}

input_of() {  # the file a step waits for in the eval lane
  case "$1" in
    random) done_marker hybridize ;;
    eval_random) done_marker random ;;
    eval_teacher) done_marker teacher ;;
    eval_hybrid) done_marker hybridize ;;
    eval_align) echo "$OUT/distill/align/final/config.json" ;;
    eval_logits) done_marker distill ;;
  esac
}

steps() {  # steps STEP ...: the given steps in order, skipping those done; a step in the eval lane first waits for
           # its input, and gives up once the other lane has failed (OUT/lane_failed)
  local step input
  for step in "$@"; do
    [[ -f $(done_marker "$step") ]] && { echo "[demo] $step: done"; continue; }
    input=$(input_of "$step")
    while [[ -n $input && ! -f $input ]]; do
      [[ -f $OUT/lane_failed ]] && { echo "[demo] $step: not run, the other lane failed" >&2; return 1; }
      sleep 5
    done
    echo "[demo] $step: start $(date +%T)"
    if [[ $step == eval_* ]]; then timed "$step" evaluate "${step#eval_}"; else timed "$step" run_stage "$step"; fi
  done
}

lane() {  # lane STEP ...: the steps in a process of their own (where `set -e` holds), marking OUT/lane_failed when
          # one fails so that the other lane stops waiting
  bash "$SELF" "$OUT" steps "$@" || { touch "$OUT/lane_failed"; return 1; }
}

all() {  # two lanes on the one GPU, then GRPO alone: its engine sleeps and wakes, which an engine starting beside it
         # would misread in vLLM's start-up memory profile
  mkdir -p "$OUT"
  rm -f "$OUT/lane_failed"
  lane teacher hybridize distill &
  local train=$!
  lane eval_teacher eval_hybrid random eval_random eval_align eval_logits &
  local evals=$!
  local status=0
  wait "$train" || status=1
  wait "$evals" || status=1
  (( status == 0 )) || { echo "[demo] a lane failed; see the log above" >&2; return 1; }
  steps grpo
}

report() {
  mkdir -p "$RESULTS"
  cp "$OUT/stage_seconds.tsv" "$RESULTS/"
  for f in teacher/sft_metrics.jsonl teacher/sft_loss.png distill/distill_metrics.jsonl distill/distill_curves.png \
           random/sft_metrics.jsonl grpo/metrics.jsonl grpo/curves.png; do
    [[ -f "$OUT/$f" ]] && cp "$OUT/$f" "$RESULTS/${f//\//_}"
  done
  local runs=()
  for name in teacher hybrid align logits random grpo; do
    [[ -f "$OUT/eval_$name/results.json" ]] && runs+=("$OUT/eval_$name")
  done
  sse eval --compare "${runs[@]}" --out "$RESULTS/compare"
  local completions=()  # the models whose wrong answers are worth sorting (bench/arith_errors.py)
  for name in teacher logits random grpo; do
    [[ -f "$OUT/eval_$name/completions.jsonl" ]] && completions+=("$name=$OUT/eval_$name/completions.jsonl") &&
      cp "$OUT/eval_$name/completions.jsonl" "$RESULTS/eval_${name}_completions.jsonl"
  done
  "$PY" -m bench.arith_errors "${completions[@]}" --out "$RESULTS/arith_errors"
  echo "wrote $RESULTS"
}

pack() {  # pack FILE: the run's metrics, evals, configs and logs, a few MiB
  tar czf "$1" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.pth' --exclude='*.bin' --exclude=checkpoints \
    --exclude='checkpoint-*' --exclude=data -C "$(dirname "$OUT")" "$(basename "$OUT")"
}

case "$STAGE" in
  eval) evaluate "${3:?$usage}" ;;
  pack) pack "${3:?$usage}" ;;
  all) all ;;
  steps) steps "${@:3}" ;;
  report) report ;;
  *) run_stage "$STAGE" ;;
esac
