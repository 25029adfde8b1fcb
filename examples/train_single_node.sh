#!/usr/bin/env bash
# Single node: torchrun with one process per GPU (or NPROC processes on CPU under gloo).
#   examples/train_single_node.sh RECIPE.yaml [section.key=value ...]
#   NPROC=2 examples/train_single_node.sh recipes/tiny-cpu.yaml parallel.tensor=2
# NPROC defaults to the number of GPUs (1 without any); PY to the project's .venv python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RECIPE=${1:?usage: examples/train_single_node.sh RECIPE.yaml [section.key=value ...]}
shift
NPROC=${NPROC:-$("$PY" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m rnope_megatron.train "$RECIPE" "$@"
