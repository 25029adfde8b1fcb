#!/usr/bin/env bash
# One prepared run for a lent GPU box (python3.12 + torch with CUDA, no megatron-core):
# installs the carried wheels from .whl/ (megatron-core and its pure-Python needs),
# then runs tools/gpu_check.py. Usage: tools/gpu_check.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python3 tools/gpu_check.py "$@"
