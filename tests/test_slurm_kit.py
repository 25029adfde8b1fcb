"""examples/slurm/train.sbatch's stop/requeue logic on CPU, with fake ``srun``,
``scontrol`` and ``torchrun`` on PATH: a pre-empted job (SIGUSR1 to the batch script, as
``--signal=B:USR1`` sends it) is requeued once; a finished one is not; a crashed one is
not, even with a stale ``exit_status.json`` from an earlier pre-emption in its run
directory. The script itself runs unmodified under bash."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.trainer import RECIPE, ROOT

SCRIPT = ROOT / "examples" / "slurm" / "train.sbatch"

FAKE_SRUN = """#!/usr/bin/env bash
# srun: drop srun's own options, run the command (exec: signals to srun reach it)
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
exec "$@"
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") echo node1; echo node2 ;;
  requeue*) echo "requeue $2" >> "$FAKE_LOG" ;;
  *) echo "fake scontrol: unexpected $*" >&2; exit 2 ;;
esac
"""

# torchrun: `--help` advertises --signals-to-handle unless FAKE_OLD_TORCH; otherwise it
# records its arguments and plays the trainer's part of the scenario.
FAKE_TORCHRUN = """#!/usr/bin/env bash
if [[ ${1:-} == --help ]]; then
  [[ -n ${FAKE_OLD_TORCH:-} ]] && echo "usage: torchrun [--nnodes N]" || echo "usage: torchrun [--signals-to-handle SIGS]"
  exit 0
fi
printf '%s\\n' "$@" > "$FAKE_DIR/torchrun_args"
status() { echo "$1" > "$FAKE_RUN_DIR/exit_status.json"; }
case "$FAKE_SCENARIO" in
  finish) status '{"done": true, "reason": "done", "iteration": 6}'; exit 0 ;;
  crash) echo "Traceback: CUDA error" >&2; exit 1 ;;
  stop_at) status '{"done": false, "reason": "stopped at train.stop_at", "iteration": 3}'; exit 0 ;;
  preempt)
    # the trainer: a stop signal -> checkpoint, exit_status.json, exit; torchrun then
    # exits non-zero (what used to stop a `set -e` script at srun)
    trap 'status "{\\"done\\": false, \\"reason\\": \\"stopped by SIGUSR1\\", \\"iteration\\": 4}"; exit 1' USR1
    touch "$FAKE_DIR/started"
    for _ in $(seq 600); do sleep 0.1; done
    exit 3 ;;
esac
"""


@pytest.fixture
def slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("torchrun", FAKE_TORCHRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    # the session's process group (tests/conftest.py) puts MASTER_ADDR/PORT in os.environ;
    # a SLURM job inherits only what its submitter set, and the script honours a MASTER_PORT
    inherited = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env = {**inherited, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PY": sys.executable,
           "FAKE_DIR": str(tmp_path), "FAKE_RUN_DIR": str(run_dir), "FAKE_LOG": str(tmp_path / "scontrol.log"),
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node[1-2]", "PYTHONPATH": str(ROOT)}
    return tmp_path, run_dir, env


def start(env, scenario, run_dir, **extra):
    return subprocess.Popen(["bash", str(SCRIPT), RECIPE, f"logging.run_dir={run_dir}"],
                            env={**env, "FAKE_SCENARIO": scenario, **extra}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def requeues(tmp_path) -> list[str]:
    log = tmp_path / "scontrol.log"
    return log.read_text().splitlines() if log.exists() else []


def test_preempted_job_checkpoints_and_is_requeued_once(slurm):
    tmp_path, run_dir, env = slurm
    proc = start(env, "preempt", run_dir)
    deadline = time.time() + 120
    while not (tmp_path / "started").exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "the fake trainer never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # SLURM's --signal=B:USR1@600
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert requeues(tmp_path) == ["requeue 4242"], out
    assert "got SIGUSR1" in out and "srun exited with status 1" in out
    args = (tmp_path / "torchrun_args").read_text().splitlines()
    assert args[args.index("--rdzv-backend") + 1] == "c10d"
    assert args[args.index("--rdzv-endpoint") + 1] == "node1:29500"
    assert "SIGUSR1" in args[args.index("--signals-to-handle") + 1].split(",")
    assert args[args.index("--nnodes") + 1] == "2" and args[args.index("--nproc-per-node") + 1] == "1"
    assert args[args.index("-m") + 1:] == ["rnope_megatron.train", RECIPE, f"logging.run_dir={run_dir}"]


def test_finished_job_is_not_requeued(slurm):
    tmp_path, run_dir, env = slurm
    proc = start(env, "finish", run_dir)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert requeues(tmp_path) == [] and "training finished" in out


def test_crashed_job_is_not_requeued_despite_a_stale_status(slurm):
    tmp_path, run_dir, env = slurm
    run_dir.mkdir()
    # left by an earlier pre-empted run of this job: must not be read as this run's
    (run_dir / "exit_status.json").write_text(json.dumps({"done": False, "reason": "stopped by SIGUSR1"}))
    proc = start(env, "crash", run_dir)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    assert requeues(tmp_path) == [], out
    assert "the trainer crashed; not requeueing" in out


def test_stop_at_is_not_requeued_and_old_torch_is_refused_before_launch(slurm):
    tmp_path, run_dir, env = slurm
    proc = start(env, "stop_at", run_dir)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and requeues(tmp_path) == [] and "not requeueing" in out, out
    (tmp_path / "torchrun_args").unlink()
    proc = start(env, "finish", run_dir, FAKE_OLD_TORCH="1")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "needs torch >= 2.9" in out, out
    assert not (tmp_path / "torchrun_args").exists()  # refused before launching anything


def test_a_bad_recipe_is_refused_before_srun(slurm):
    tmp_path, run_dir, env = slurm
    proc = subprocess.Popen(["bash", str(SCRIPT), RECIPE, "parallel.tensor=3"], env={**env, "FAKE_SCENARIO": "finish"},
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "rnope-plan: bad recipe: model.num_attention_heads=4 is not divisible by parallel.tensor=3" in out
    assert not (tmp_path / "torchrun_args").exists()


def test_dockerfile_builds_on_an_ngc_pytorch_with_signal_forwarding():
    """The image pins an NGC tag whose torch has --signals-to-handle (>= 25.10: torch 2.9)
    and installs the plugin; the check it runs at build time is the sbatch script's."""
    text = (ROOT / "examples" / "slurm" / "Dockerfile").read_text()
    image = next(line.split()[1] for line in text.splitlines() if line.startswith("FROM "))
    repo, tag = image.split(":")
    assert repo == "nvcr.io/nvidia/pytorch" and tag.endswith("-py3")
    year, month = map(int, tag.split("-")[0].split("."))
    assert (year, month) >= (25, 10), tag
    assert "pip install" in text and "-e ." in text and "--signals-to-handle" in text
