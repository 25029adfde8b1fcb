#!/usr/bin/env bash
# One prepared run for a lent GPU box (python3.12 + torch with CUDA, no megatron-core).
#
#   tools/gpu_check.sh --prepare   # here, on a CPU machine with the venv: wheels + CPU reference
#   tools/gpu_check.sh [--quick] [--te]  # there: installs .whl/*.whl, runs tools/gpu_check.py
#   tools/gpu_check.sh --dry-run   # anywhere: lists the checks, validates their recipes
#   tools/gpu_check.sh --prepare --te    # here: also TE and what it needs, in parts (.whl/te/)
#   tools/gpu_check.sh --dry-run --te    # here: verify the parts, reassemble, print the device calls
#   tools/gpu_check.sh --te-install      # there, after the parts were carried: reassemble,
#                                        # verify, install offline, build TE's extension (timed)
#
# --prepare downloads the megatron-core py3.12 wheel into .whl/ and trains the tiny recipe
# for 10 iterations on CPU into .gpu_ref/ (metrics + data cache), the oracle the GPU
# trainer run is compared with. Both folders are git-ignored; carry them to the GPU box.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--prepare" ]]; then
  py=${PYTHON:-.venv/bin/python}
  if [[ "${2:-}" == "--te" ]]; then
    # TE's wheels, its extension's source, megatron-core and the pure-Python needs, cut into
    # parts of <= 60 MiB, one folder per device call (tools/te_bundle.py; docs/gpu-kit.md)
    $py tools/te_bundle.py prepare .whl/te
  fi
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
  py=${PYTHON:-.venv/bin/python}
  if [[ "${2:-}" == "--te" ]]; then
    $py tools/te_bundle.py verify .whl/te
    $py tools/te_bundle.py plan .whl/te
  fi
  exec $py tools/gpu_check.py --dry-run
fi
if [[ "${1:-}" == "--te-install" ]]; then
  # the box: every part carried (files under ignored paths survive while it stays warm)
  rm -rf /tmp/te-wheels && python3 tools/te_bundle.py verify .whl/te --into /tmp/te-wheels
  python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/te-wheels/*.whl
  start=$(date +%s)
  PYTHONPATH=/tmp/site:${PYTHONPATH:-} NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS=16 python3 -m pip install -q \
    --no-index --no-deps --no-build-isolation --target /tmp/site /tmp/te-wheels/transformer_engine_torch-*.tar.gz
  echo "transformer_engine_torch built in $(( $(date +%s) - start )) s"
  PYTHONPATH=/tmp/site python3 -c "import transformer_engine.pytorch as te; print('TE', te.__version__ if hasattr(te, '__version__') else 'imported')"
  exit 0
fi
if [[ -d /tmp/site/transformer_engine ]]; then
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
reference=()
[[ -f .gpu_ref/metrics.jsonl ]] && reference=(--cpu-reference .gpu_ref)
python3 tools/gpu_check.py "${reference[@]}" "$@"
