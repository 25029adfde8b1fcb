"""Helpers for tests that run the package's commands as a user does: the installed
console scripts (or ``python -m``) in subprocesses, with their exit status and output."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "recipes" / "tiny-cpu.yaml")
FAST = [
    "train.iters=6", "train.micro_batch_size=2", "train.global_batch_size=8",
    "train.seq_length=128", "scheduler.warmup_iters=2", "logging.interval=1",
    "logging.tensorboard=false", "checkpoint.interval=100",
]


def console_script(name: str) -> str:
    """The installed entry point (``pip install -e .`` put it beside the interpreter)."""
    path = pathlib.Path(sys.executable).with_name(name)
    assert path.is_file(), f"console script {name} is not installed beside {sys.executable}"
    return str(path)


def train_cmd(run_dir, *overrides, nproc=None, recipe=RECIPE):
    """``python -m rnope_megatron.train`` when ``nproc`` is None, else torchrun."""
    launcher = [sys.executable, "-m", "rnope_megatron.train"]
    if nproc is not None:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={nproc}", "-m", "rnope_megatron.train"]
    return launcher + [recipe, *FAST, f"logging.run_dir={run_dir}", *overrides]


def train(run_dir, *overrides, nproc=None, check=True, timeout=600, env=None):
    proc = subprocess.run(train_cmd(run_dir, *overrides, nproc=nproc), capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=None if env is None else {**os.environ, **env})
    if check and proc.returncode:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def eval_cli(*args, timeout=600):
    """The installed ``rnope-eval`` with ``args`` (paths allowed), run from the checkout."""
    return subprocess.run([console_script("rnope-eval"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def metrics(run_dir) -> list[dict]:
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(run_dir) -> dict[int, float]:
    """iteration -> loss (each iteration is logged once, also across a resume)."""
    return {m["iteration"]: m["loss"] for m in metrics(run_dir)}


def exit_status(run_dir) -> dict:
    return json.loads((pathlib.Path(run_dir) / "exit_status.json").read_text())


def assert_one_line_error(proc, prog: str, *fragments: str) -> str:
    """A failure a user can cause: non-zero exit, no traceback, and a last stderr line
    ``prog: ...`` holding every fragment. Returns that line."""
    assert proc.returncode != 0, f"expected a failure:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = proc.stderr.strip().splitlines()
    assert lines, "no message on stderr"
    last = lines[-1]
    assert last.startswith(f"{prog}: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    return last


def refused(script: str, main, *args, installed: bool = False) -> str:
    """The one line with which ``script`` refuses ``args``. ``installed``: its installed
    console script in a subprocess (exit status, no traceback: :func:`assert_one_line_error`);
    otherwise its ``main()`` in this process, which must exit with that line
    (``SystemExit(line)``, which the interpreter prints before exiting 1). Parametrised
    refusals run in-process, one case per command through the installed script: each
    process start imports torch and Megatron."""
    args = [str(arg) for arg in args]
    if installed:
        proc = subprocess.run([console_script(script), *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
        return assert_one_line_error(proc, script)
    try:
        main(args)
    except SystemExit as exited:
        line = exited.code
    else:
        raise AssertionError(f"{script} {' '.join(args)} did not refuse")
    assert isinstance(line, str) and "\n" not in line and line.startswith(f"{script}: "), repr(line)
    return line
