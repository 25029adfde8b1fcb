#!/usr/bin/env bash
# Single node: torchrun with one process per GPU (or per CPU slot under gloo).
#   examples/train_single_node.sh RECIPE.yaml [NPROC] [section.key=value ...]
# e.g. examples/train_single_node.sh recipes/tiny-cpu.yaml 2 parallel.tensor=2
set -euo pipefail
RECIPE=${1:?recipe.yaml}
NPROC=${2:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
shift $(( $# >= 2 ? 2 : 1 ))
exec torchrun --standalone --nproc-per-node "$NPROC" -m rnope_megatron.train "$RECIPE" "$@"
