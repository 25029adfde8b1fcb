#!/usr/bin/env bash
# A small reproduction of the paper's claim ("Rope to Nope and Back Again", arXiv
# 2501.18795): RNoPE-SWA retrieves far past its training length, the all-global RoPE
# baseline does not. Both models are trained by rnope-train on the same recipe
# (recipes/reproduce-small.yaml: 4 layers, d=128, window 32, 128-token sequences, the
# passkey retrieval mix with the loss on the answers), differing only in model.pattern
# (SSSG vs R: same parameter count, same data order), then evaluated by rnope-eval
# passkey at 1x-16x the training length. Then the language-modelling half: SSSG, R and
# all-NoPE (G) trained on the embedded corpus alone, loss per octave of position up to 16x.
#
#   examples/reproduce_paper_small.sh            # 3 seeds, 1x-16x   (7.5 min on 2 idle cores)
#   examples/reproduce_paper_small.sh --quick    # 1 seed,  1x-8x    (2 min)
#   OUT=/tmp/repro examples/reproduce_paper_small.sh --quick
#   EXTRA="train.iters=20 scheduler.warmup_iters=2" ...   # extra rnope-train overrides (smoke test)
#   JOBS=2 ...                                   # train the two models of a seed at once
#
# Writes $OUT/results.json (per model and length: mean accuracy over seeds, and each
# seed's), $OUT/results.md (the table) and $OUT/results.png; each run's metrics and each
# evaluation's JSON/heatmap stay under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
OUT=${OUT:-runs/reproduce-small}
# the repository's .venv when there is one, else the rnope-train on PATH
if [[ -z "${BIN:-}" ]]; then
  if [[ -x .venv/bin/rnope-train ]]; then BIN=.venv/bin; else BIN=$(dirname "$(command -v rnope-train)"); fi
fi
if [[ $QUICK == 1 ]]; then
  SEEDS=(1); LENGTHS=128,256,512,1024; SAMPLES=10
else
  SEEDS=(1 2 3); LENGTHS=128,256,512,1024,2048; SAMPLES=10
fi
mkdir -p "$OUT"
started=$(date +%s)

MODELS=(rnope-swa:SSSG rope-baseline:R)

train_one() {  # name pattern seed [override...]
  local name=$1 pattern=$2 seed=$3; shift 3
  local run="$OUT/$name-seed$seed"
  echo "== train $name (pattern $pattern) seed $seed -> $run"
  "$BIN/rnope-train" recipes/reproduce-small.yaml "model.pattern=$pattern" "train.seed=$seed" \
    "logging.run_dir=$run" "data.cache_dir=$OUT/data" "$@" ${EXTRA:-} > "$run.log" 2>&1 || {
      echo "rnope-train failed for $name seed $seed; see $run.log" >&2; return 1; }
  grep -E "^eval|rnope-train:" "$run.log" | sed "s/^/   [$name] /" || true
}

for seed in "${SEEDS[@]}"; do
  if [[ ${JOBS:-1} -gt 1 ]]; then
    # both models at once, one thread each: on 2 shared cores this keeps both busy
    # without the barrier waits a 2-thread step suffers when a thread is descheduled
    pids=()
    for model in "${MODELS[@]}"; do
      train_one "${model%%:*}" "${model##*:}" "$seed" train.cpu_threads=1 & pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
  else
    for model in "${MODELS[@]}"; do train_one "${model%%:*}" "${model##*:}" "$seed"; done
  fi
  for model in "${MODELS[@]}"; do
    name=${model%%:*}
    echo "== evaluate $name seed $seed at $LENGTHS"
    "$BIN/rnope-eval" passkey --checkpoint "$OUT/$name-seed$seed/checkpoints" --lengths "$LENGTHS" \
      --depths 0,0.25,0.5,0.75,1 --samples "$SAMPLES" --seed "$seed" --quiet \
      --json "$OUT/passkey-$name-seed$seed.json" --png "$OUT/passkey-$name-seed$seed.png" | tail -1
  done
done

# The language-modelling half of the claim: loss per position past the training length.
# SSSG, R and all-NoPE G, same parameters, trained on the embedded corpus alone (no
# retrieval, loss on every token), then rnope-eval loss per octave of position at 16x.
LM_ITERS=${LM_ITERS:-$([[ $QUICK == 1 ]] && echo 500 || echo 1000)}
printf 'source: default\ntokenizer: bytes\ncache_dir: %s\n' "$OUT/data" > "$OUT/corpus-data.yaml"
MAX=${LENGTHS##*,}
for model in rnope-swa:SSSG rope-baseline:R nope:G; do
  name=${model%%:*}
  train_one "lm-$name" "${model##*:}" "${SEEDS[0]}" data.source=default data.retrieval_fraction=0 \
    data.retrieval_loss=all eval.interval=0 "train.iters=$LM_ITERS" "scheduler.warmup_iters=$(( LM_ITERS / 20 ))"
  echo "== loss per position of lm-$name at $MAX tokens"
  "$BIN/rnope-eval" loss --checkpoint "$OUT/lm-$name-seed${SEEDS[0]}/checkpoints" --data "$OUT/corpus-data.yaml" \
    --length "$MAX" --samples 16 --seed 7 --json "$OUT/loss-$name.json" | tail -1
done

"$BIN/python" examples/reproduce_table.py "$OUT" --seconds $(( $(date +%s) - started ))
