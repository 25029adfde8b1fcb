#!/usr/bin/env bash
# A small reproduction of the paper's claim ("Rope to Nope and Back Again", arXiv
# 2501.18795): RNoPE-SWA retrieves far past its training length, the all-global RoPE
# baseline does not. Both models are trained by rnope-train on the same recipe
# (recipes/reproduce-small.yaml: 4 layers, d=128, window 32, 256-token sequences, the
# embedded corpus + 50% retrieval mix), differing only in model.pattern (SSSG vs R: same
# parameter count, same data order), then evaluated by rnope-eval passkey at 1x-16x the
# training length.
#
#   examples/reproduce_paper_small.sh            # 3 seeds, 1x-16x   (about 1 hour on 2 cores)
#   examples/reproduce_paper_small.sh --quick    # 1 seed,  1x-8x    (about 15 minutes)
#   OUT=/tmp/repro examples/reproduce_paper_small.sh --quick
#   EXTRA="train.iters=20 scheduler.warmup_iters=2" ...   # extra rnope-train overrides (smoke test)
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
  SEEDS=(1); LENGTHS=256,512,1024,2048; SAMPLES=10
else
  SEEDS=(1 2 3); LENGTHS=256,512,1024,2048,4096; SAMPLES=10
fi
mkdir -p "$OUT"
started=$(date +%s)

for seed in "${SEEDS[@]}"; do
  for model in rnope-swa:SSSG rope-baseline:R; do
    name=${model%%:*}; pattern=${model##*:}
    run="$OUT/$name-seed$seed"
    echo "== train $name (pattern $pattern) seed $seed -> $run"
    "$BIN/rnope-train" recipes/reproduce-small.yaml "model.pattern=$pattern" "train.seed=$seed" \
      "logging.run_dir=$run" "data.cache_dir=$OUT/data" ${EXTRA:-} | grep -E "^(eval|rnope-train:)|iter +(500|1000|1500)/" || true
    test -f "$run/exit_status.json" && grep -q '"done": true' "$run/exit_status.json"
    echo "== evaluate $name seed $seed at $LENGTHS"
    "$BIN/rnope-eval" passkey --checkpoint "$run/checkpoints" --lengths "$LENGTHS" \
      --depths 0,0.25,0.5,0.75,1 --samples "$SAMPLES" --seed "$seed" --quiet \
      --json "$OUT/passkey-$name-seed$seed.json" --png "$OUT/passkey-$name-seed$seed.png"
  done
done

"$BIN/python" examples/reproduce_table.py "$OUT" --seconds $(( $(date +%s) - started ))
