"""Nothing lost, nothing leaked: the trainer under kills, signals to its whole process
group, a second trainer on its run directory, a full disk, damaged checkpoints and a
changed architecture. Faults happen at fixed points (the RNOPE_FAULT hook) or from the
outside exactly as an operator causes them; every failure must end in one line naming
the file or field, with a non-zero exit status and nothing half-written."""

import os
import shutil
import signal
import subprocess
import time

import psutil
import pytest

from tests.conftest import SAVED_RUN_ARGS as COMMON  # the `saved_run` fixture's run (conftest)
from tests.trainer import ROOT, assert_one_line_error, exit_status, metrics, train, train_cmd


def _start_and_wait_for_stop(run_dir, data_cache, point: str):
    """Start a trainer that SIGSTOPs itself at ``point`` (RNOPE_FAULT) and wait until it
    has: a fixed place to look at it from outside. Returns (Popen, psutil.Process)."""
    proc = subprocess.Popen(train_cmd(run_dir, f"data.cache_dir={data_cache}", *COMMON), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "RNOPE_FAULT": f"stop@{point}"})
    trainer = psutil.Process(proc.pid)
    deadline = time.time() + 300
    while trainer.status() != psutil.STATUS_STOPPED:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"the trainer never reached {point}")
        time.sleep(0.05)
    return proc, trainer


def _copy_run(saved_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(saved_run, run_dir)
    (run_dir / "exit_status.json").unlink()
    return run_dir


@pytest.mark.parametrize("sig, action", [(signal.SIGTERM, "term_group"), (signal.SIGUSR1, "usr1_group")])
def test_signal_to_the_whole_process_group_still_saves_and_exits_0(tmp_path, data_cache, sig, action):
    """timeout, kill -- -PGID and schedulers signal every process of the job's group. The
    trainer (its own group leader here) signals its group right after iteration 3, when a
    checkpoint (iteration 2) was already written: any helper process a save left running
    gets the signal too. The run must save iteration 3 and exit 0 with exit_status.json."""
    proc = subprocess.run(
        train_cmd(tmp_path, f"data.cache_dir={data_cache}", "train.iters=8", "checkpoint.interval=2"),
        cwd=ROOT, capture_output=True, text=True, timeout=600, start_new_session=True,
        env={**os.environ, "RNOPE_FAULT": f"{action}@after_step:3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"stopped by {sig.name}" in proc.stdout
    status = exit_status(tmp_path)
    assert status["iteration"] == 3 and status["done"] is False
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "iter_0000003"
    assert not list(checkpoints.glob("*.tmp"))


def test_kill_9_leaves_no_process_behind(tmp_path, data_cache):
    """The trainer stops itself (SIGSTOP) once checkpoint 2 is in place; everything it
    started is listed, then it is killed with SIGKILL: none of them may survive. (Megatron's
    writer used to start a multiprocessing Manager (~576 MB) and a resource tracker per
    rank, orphaned forever by a kill -9.)"""
    proc, trainer = _start_and_wait_for_stop(tmp_path, data_cache, "after_save:2")
    try:
        started = trainer.children(recursive=True)
    finally:
        proc.kill()
        proc.wait()
    gone, alive = psutil.wait_procs(started, timeout=10)
    for leftover in alive:
        leftover.kill()
    assert not alive, [p.cmdline() for p in alive]
    assert started == [], "the trainer started helper processes: " + str([p.pid for p in started])


def test_kill_9_during_a_save_keeps_the_previous_checkpoint(tmp_path, data_cache):
    """SIGKILL after the shards of checkpoint 4 are written but before it is complete:
    `latest` still names checkpoint 2, the resumed run finishes, and the partial
    directory is gone after the next save."""
    proc = train(tmp_path, f"data.cache_dir={data_cache}", *COMMON, "train.iters=6", check=False,
                 env={"RNOPE_FAULT": "kill@mid_save:4"})
    assert proc.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "iter_0000002"
    assert (checkpoints / "iter_0000004.tmp").is_dir()
    out = train(tmp_path, f"data.cache_dir={data_cache}", *COMMON, "train.iters=6")
    assert f"resumed from {checkpoints}/iter_0000002" in out.stdout
    assert not list(checkpoints.glob("*.tmp"))
    assert sorted(p.name for p in checkpoints.glob("iter_*")) == ["iter_0000004", "iter_0000006"]


def test_a_second_trainer_on_the_same_run_directory_is_refused(tmp_path, data_cache):
    """While one trainer holds the run directory, a second one stops before touching it,
    naming the holder; once the holder is gone (even by kill -9) the directory is free."""
    first, _ = _start_and_wait_for_stop(tmp_path, data_cache, "after_step:1")
    try:
        logged = (tmp_path / "metrics.jsonl").read_text()
        second = train(tmp_path, f"data.cache_dir={data_cache}", *COMMON, check=False)
        assert_one_line_error(second, "rnope-train", f"run directory {tmp_path} is in use", f"pid {first.pid}")
        assert (tmp_path / "metrics.jsonl").read_text() == logged  # the second wrote nothing
    finally:
        first.kill()
        first.wait()
    train(tmp_path, f"data.cache_dir={data_cache}", *COMMON)  # the kernel released the lock
    assert [m["iteration"] for m in metrics(tmp_path)] == [1, 2, 3, 4]


@pytest.mark.parametrize("override, field", [
    ("model.pattern=SSSR", "model.pattern: 'SSSGSSSG' -> 'SSSRSSSR'"),
    ("model.vocab_size=1024", "model.vocab_size: 512 -> 1024"),
    ("model.hidden_size=192", "model.hidden_size: 128 -> 192"),
])
def test_resume_with_another_architecture_is_refused(saved_run, tmp_path, data_cache, override, field):
    run_dir = _copy_run(saved_run, tmp_path)
    out = train(run_dir, f"data.cache_dir={data_cache}", *COMMON, "train.iters=6", override, check=False)
    assert_one_line_error(out, "rnope-train", "iter_0000004 holds another model than this recipe", field)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000004"


def test_a_new_stage_may_change_only_the_sequence_length(saved_run, tmp_path, data_cache):
    stage = [f"data.cache_dir={data_cache}", *COMMON, f"checkpoint.load={saved_run / 'checkpoints'}",
             "checkpoint.reset_optimizer=true", "train.iters=2"]
    out = train(tmp_path / "longer", *stage, "model.max_seq_length=8192")
    assert "(weights only) at iteration 0" in out.stdout
    refused = train(tmp_path / "other", *stage, "model.window=32", check=False)
    assert_one_line_error(refused, "rnope-train", "model.window: 64 -> 32")


def test_resuming_with_another_thread_count_warns(saved_run, tmp_path, data_cache):
    """CPU results depend on torch's intra-op thread count (reductions split by it): the
    count is recorded with each checkpoint and a resume under another one says so."""
    from rnope_megatron.checkpoint.layout import common_state

    run_dir = _copy_run(saved_run, tmp_path)
    saved = common_state(run_dir / "checkpoints" / "iter_0000004")["train_state"]["runtime"]["intra_op_threads"]
    out = train(run_dir, f"data.cache_dir={data_cache}", *COMMON, "train.iters=5", f"train.cpu_threads={saved + 1}")
    assert f"warning: resuming with intra_op_threads {saved} -> {saved + 1}" in out.stdout


@pytest.mark.parametrize("damage, fragments", [
    ("latest_garbage", ["latest does not name a checkpoint", "complete checkpoints there: iter_0000002, iter_0000004"]),
    ("latest_missing_iteration", ["names", "iter_0000009", "not a complete checkpoint (it does not exist)",
                                  "iter_0000002, iter_0000004"]),
    ("truncated_shard", ["iter_0000004, which is not a complete checkpoint (__0_0.distcp is truncated",
                         "complete checkpoints there: iter_0000002"]),
    ("missing_shard", ["iter_0000004, which is not a complete checkpoint (__0_0.distcp is missing)",
                       "complete checkpoints there: iter_0000002"]),
    ("missing_metadata", ["iter_0000004, which is not a complete checkpoint (.metadata is missing)",
                          "complete checkpoints there: iter_0000002"]),
    ("garbled_metadata", ["iter_0000004 could not be read", "complete checkpoints there: iter_0000002"]),
])
def test_a_damaged_checkpoint_ends_in_one_line_naming_it(saved_run, tmp_path, data_cache, damage, fragments):
    run_dir = _copy_run(saved_run, tmp_path)
    checkpoints = run_dir / "checkpoints"
    if damage == "latest_garbage":
        (checkpoints / "latest").write_bytes(os.urandom(64))
    elif damage == "latest_missing_iteration":
        (checkpoints / "latest").write_text("iter_0000009\n")
    elif damage == "truncated_shard":
        shard = checkpoints / "iter_0000004" / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "missing_shard":
        (checkpoints / "iter_0000004" / "__0_0.distcp").unlink()
    elif damage == "missing_metadata":
        (checkpoints / "iter_0000004" / ".metadata").unlink()
    else:  # same size, other bytes: complete by the manifest, unreadable by torch
        metadata = checkpoints / "iter_0000004" / ".metadata"
        metadata.write_bytes(os.urandom(metadata.stat().st_size))
    out = train(run_dir, f"data.cache_dir={data_cache}", *COMMON, "train.iters=6", check=False)
    assert_one_line_error(out, "rnope-train", *fragments)
    assert not metrics(run_dir)[4:], "nothing may be trained past the damage"


def _mount_tmpfs(path, size_mb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def test_a_full_disk_during_a_save_says_so_and_keeps_latest(tmp_path, data_cache):
    """A 30 MB file system holds one checkpoint of the tiny model (~20 MB), not two: the
    second save hits ENOSPC. The run stops with one line saying so and where; `latest`
    still names the first checkpoint and no partial directory is left."""
    checkpoints = tmp_path / "checkpoints"
    if not _mount_tmpfs(checkpoints, 30):
        pytest.skip("cannot mount a small tmpfs here (needs root/CAP_SYS_ADMIN)")
    try:
        out = train(tmp_path, f"data.cache_dir={data_cache}", *COMMON, "checkpoint.keep=2", check=False)
        assert_one_line_error(out, "rnope-train", "no space left on device while writing checkpoint",
                              str(checkpoints / "iter_0000004.tmp"), "'latest' names iter_0000002")
        assert (checkpoints / "latest").read_text().strip() == "iter_0000002"
        assert not list(checkpoints.glob("*.tmp"))
    finally:
        subprocess.run(["umount", str(checkpoints)], check=True)
