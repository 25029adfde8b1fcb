#!/usr/bin/env bash
# One prepared run for a lent GPU box (python3.12 + torch with CUDA, no megatron-core).
#
#   tools/gpu_check.sh --prepare   # here, on a CPU machine with the venv: wheels + CPU reference
#   tools/gpu_check.sh [--quick] [--te]  # there: installs .whl/*.whl, runs tools/gpu_check.py
#   tools/gpu_check.sh --dry-run   # anywhere: lists the checks, validates their recipes
#
# --prepare downloads the megatron-core py3.12 wheel into .whl/ and trains the tiny recipe
# for 10 iterations on CPU into .gpu_ref/ (metrics + data cache), the oracle the GPU
# trainer run is compared with. Both folders are git-ignored; carry them to the GPU box.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--prepare" ]]; then
  py=${PYTHON:-.venv/bin/python}
  version=$($py -c "import importlib.metadata as m; print(m.version('megatron-core'))")
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl "megatron-core==$version"
  rm -rf .gpu_ref && mkdir -p .gpu_ref
  $py -m rnope_megatron.train recipes/tiny-cpu.yaml train.iters=10 logging.interval=1 checkpoint.interval=5 \
    logging.tensorboard=false logging.run_dir=/tmp/gpu_ref_run data.cache_dir=.gpu_ref/data
  cp /tmp/gpu_ref_run/metrics.jsonl .gpu_ref/ && rm -rf /tmp/gpu_ref_run .gpu_ref/data/index-cache
  exit 0
fi
if [[ "${1:-}" == "--dry-run" ]]; then
  # any machine: list the checks and validate the recipes they train (no GPU, no TE)
  exec ${PYTHON:-.venv/bin/python} tools/gpu_check.py --dry-run
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
reference=()
[[ -f .gpu_ref/metrics.jsonl ]] && reference=(--cpu-reference .gpu_ref)
python3 tools/gpu_check.py "${reference[@]}" "$@"
