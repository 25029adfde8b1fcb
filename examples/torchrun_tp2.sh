#!/usr/bin/env bash
# Two processes, tensor parallel 2, on CPU (gloo) or GPU (NCCL).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m torch.distributed.run --standalone --nproc-per-node 2 examples/build_and_inspect.py --tensor 2 "$@"
