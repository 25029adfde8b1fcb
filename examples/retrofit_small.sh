#!/usr/bin/env bash
# Retrofit, small: an all-RoPE model (the "user's existing model") turned into RNoPE-SWA
# and uptrained, beside (a) the RoPE model, (b) the retrofit before uptraining and (c)
# SSSG trained from scratch for the same total steps. Every step is the installed tools:
#   1. rnope-train a tiny R model (recipes/reproduce-small.yaml's model, 128 tokens) on the
#      embedded corpus + the passkey retrieval mix (data.source=default, RETRIEVAL share)
#   2. rnope-convert to-hf --arch llama            (it is now a LlamaForCausalLM)
#   3. rnope-convert from-hf --pattern SSSG --window 32   (the retrofit)
#   4. rnope-train UP more steps from the retrofit (checkpoint.load, fresh optimizer)
#   5. rnope-eval passkey at 1x-16x and rnope-eval loss per position on the corpus
#
#   examples/retrofit_small.sh            # PRE=1500 pretraining steps, UP=300 (20%)
#   examples/retrofit_small.sh --quick    # PRE=300, UP=60, lengths up to 8x
#   PRE=.. UP=.. RETRIEVAL=0.5 OUT=/tmp/rf examples/retrofit_small.sh
#
# Writes $OUT/results.json, results.md and results.png (examples/retrofit_table.py).
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
OUT=${OUT:-runs/retrofit-small}
if [[ -z "${BIN:-}" ]]; then
  if [[ -x .venv/bin/rnope-train ]]; then BIN=.venv/bin; else BIN=$(dirname "$(command -v rnope-train)"); fi
fi
if [[ $QUICK == 1 ]]; then
  PRE=${PRE:-300}; UP=${UP:-60}; LENGTHS=${LENGTHS:-128,256,512,1024}; SAMPLES=${SAMPLES:-5}
else
  PRE=${PRE:-1500}; UP=${UP:-300}; LENGTHS=${LENGTHS:-128,256,512,1024,2048}; SAMPLES=${SAMPLES:-10}
fi
RETRIEVAL=${RETRIEVAL:-0.5}
WINDOW=32
mkdir -p "$OUT"
started=$(date +%s)
DATA=("data.source=default" "data.retrieval_fraction=$RETRIEVAL" "data.cache_dir=$OUT/data")

train() {  # run_dir iters [override...]
  local run=$1 iters=$2; shift 2
  echo "== rnope-train -> $run ($iters steps) $*"
  "$BIN/rnope-train" recipes/reproduce-small.yaml "${DATA[@]}" "train.iters=$iters" \
    "logging.run_dir=$run" "checkpoint.interval=$iters" "eval.interval=$iters" "scheduler.warmup_iters=$(( iters / 20 ))" "$@" ${EXTRA:-} > "$run.log" 2>&1 || {
      echo "rnope-train failed; see $run.log" >&2; return 1; }
}

train "$OUT/rope" "$PRE" model.pattern=R
"$BIN/rnope-convert" to-hf "$OUT/rope/checkpoints" "$OUT/rope-llama" --arch llama --dtype fp32 --force
"$BIN/rnope-convert" from-hf "$OUT/rope-llama" "$OUT/retrofit" --pattern SSSG --window $WINDOW --force
train "$OUT/uptrained" "$UP" model.pattern=SSSG "model.window=$WINDOW" "checkpoint.load=$OUT/retrofit" \
  checkpoint.reset_optimizer=true
train "$OUT/scratch" $(( PRE + UP )) model.pattern=SSSG "model.window=$WINDOW"

MAX=${LENGTHS##*,}
declare -A CKPT=([rope]="$OUT/rope/checkpoints" [retrofit]="$OUT/retrofit" \
                 [uptrained]="$OUT/uptrained/checkpoints" [scratch]="$OUT/scratch/checkpoints")
for name in rope retrofit uptrained scratch; do
  echo "== evaluate $name"
  "$BIN/rnope-eval" passkey --checkpoint "${CKPT[$name]}" --lengths "$LENGTHS" --depths 0,0.25,0.5,0.75,1 \
    --samples "$SAMPLES" --seed 1 --quiet --json "$OUT/passkey-$name.json" | tail -1
  "$BIN/rnope-eval" loss --checkpoint "${CKPT[$name]}" --data recipes/tiny-cpu.yaml --length "$MAX" \
    --samples 8 --seed 1 --json "$OUT/loss-$name.json" > /dev/null
done
"$BIN/python" examples/retrofit_table.py "$OUT" --pre "$PRE" --up "$UP" --seconds $(( $(date +%s) - started ))
