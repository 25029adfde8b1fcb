"""Nothing lost, round two (issue 21): the installed console scripts under two trainers on
one folder, a killed launcher, pre-emption during an eval gate and inputs that cannot fit.
Faults happen at fixed points (RNOPE_FAULT, :mod:`rnope_megatron.common.faults`), never after a
guessed delay; every refusal ends in one line naming the folder, file or field, leaves
the inputs' bytes unchanged and leaves no file and no process behind."""

from __future__ import annotations

import hashlib
import os
import pathlib
import signal
import subprocess
import uuid

import psutil
import pytest

from tests.conftest import SAVED_RUN_ARGS
from tests.trainer import FAST, RECIPE, ROOT, assert_one_line_error, console_script, exit_status, losses, metrics


def rnope_train(run_dir, *overrides) -> list[str]:
    """The installed ``rnope-train`` on the tiny CPU recipe (tests/trainer.py FAST)."""
    return [console_script("rnope-train"), RECIPE, *FAST, f"logging.run_dir={run_dir}", *overrides]


def run(cmd, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, **kwargs)


def tree_digest(folder) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> digest)."""
    folder = pathlib.Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def start_stopped(cmd, point: str, env=None):
    """Start ``cmd`` with RNOPE_FAULT=stop@POINT and wait until it has SIGSTOPped itself
    there. Returns the Popen (the caller kills it)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {}), "RNOPE_FAULT": f"stop@{point}"})
    process = psutil.Process(proc.pid)
    while process.status() != psutil.STATUS_STOPPED:
        if proc.poll() is not None:
            raise AssertionError(f"{cmd[0]} exited ({proc.returncode}) before reaching {point}")
        psutil.wait_procs([process], timeout=0.05)  # returns at once if it exits
    return proc


def tagged_processes(tag: str) -> list[psutil.Process]:
    """The live processes started with RNOPE_TEST_TAG=tag in their environment."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RNOPE_TEST_TAG") == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


# ----------------------------------------------------------------- 1: one trainer per folder

def test_a_second_trainer_on_the_same_checkpoint_directory_is_refused(tmp_path, data_cache):
    """Two trainers with their own run directories and one checkpoint.dir: the second
    stops before touching anything, in one line naming the folder and the holder, and
    leaves nothing behind (not even its own run directory); after the holder dies
    (kill -9) the folder is free again."""
    checkpoints = tmp_path / "shared-checkpoints"
    args = [f"data.cache_dir={data_cache}", *SAVED_RUN_ARGS, f"checkpoint.dir={checkpoints}"]
    first = start_stopped(rnope_train(tmp_path / "first", *args), "after_save:2")
    try:
        before = tree_digest(checkpoints)
        second = run(rnope_train(tmp_path / "second", *args))
        assert_one_line_error(second, "rnope-train", f"checkpoint directory {checkpoints} is in use",
                              f"pid {first.pid}", "checkpoint.dir")
        assert tree_digest(checkpoints) == before
        assert not (tmp_path / "second").exists()
    finally:
        first.kill()
        first.wait()
    third = run(rnope_train(tmp_path / "third", *args))  # the kernel released the dead run's lock
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"resumed from {checkpoints}/iter_0000002" in third.stdout


def test_a_run_directory_used_as_another_runs_checkpoint_directory_is_refused(tmp_path, data_cache):
    """checkpoint.dir = another live run's run directory: the same folder, refused."""
    first = start_stopped(rnope_train(tmp_path / "first", f"data.cache_dir={data_cache}", *SAVED_RUN_ARGS),
                          "after_step:1")
    try:
        second = run(rnope_train(tmp_path / "second", f"data.cache_dir={data_cache}", *SAVED_RUN_ARGS,
                                 f"checkpoint.dir={tmp_path / 'first'}"))
        assert_one_line_error(second, "rnope-train", f"{tmp_path / 'first'} is in use", f"pid {first.pid}")
        assert not (tmp_path / "second").exists()
    finally:
        first.kill()
        first.wait()


def test_two_runs_building_one_data_cache_take_turns(tmp_path, saved_run):
    """A run stopped while it holds a fresh data cache's build lock: a second run on that
    cache says it waits for it (naming the folder and the holder) and builds nothing;
    once the first finishes, the second reads what the first built, and both train
    exactly as the shared-cache reference run did."""
    cache = tmp_path / "cache"
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first = start_stopped(rnope_train(first_dir, f"data.cache_dir={cache}", *SAVED_RUN_ARGS), "building_data:0")
    try:
        second = subprocess.Popen(rnope_train(second_dir, f"data.cache_dir={cache}", *SAVED_RUN_ARGS), cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        said = ""
        for line in second.stderr:  # blocks until the second run says something or exits
            said += line
            if "data cache" in line:
                break
        assert f"data cache {cache} is being built by pid {first.pid}" in said, said[-3000:]
        assert not list(cache.glob("*.bin*")), "the waiting run wrote into the cache"
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=600) == 0
        rest = second.communicate(timeout=600)[1]
        assert second.returncode == 0, rest[-3000:]
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    reference = losses(saved_run)
    assert losses(first_dir) == reference and losses(second_dir) == reference


# ----------------------------------------------------------------- 8: the launcher dies

def test_kill_9_of_torchrun_stops_its_workers_and_frees_the_run(tmp_path, data_cache):
    """rnope-train under torchrun with 2 workers; rank 0 SIGKILLs torchrun right after
    iteration 2 (kill_parent, as ``kill -9 <torchrun pid>``). Both workers notice that
    their launcher is gone, save a checkpoint, exit and release the run's locks: no
    worker is left, and a new run in the same folders resumes from that checkpoint. (The
    run asks for 2000 iterations: a worker that did not notice would train on for many
    minutes; the bounded wait below only detects that.)"""
    tag = uuid.uuid4().hex
    cmd = [console_script("torchrun"), "--standalone", "--nproc-per-node=2", "--no-python",
           *rnope_train(tmp_path, f"data.cache_dir={data_cache}", "train.iters=2000", "scheduler.warmup_iters=1")]
    with open(tmp_path / "torchrun.log", "w") as log:
        torchrun = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "RNOPE_FAULT": "kill_parent@after_step:2",
                                         "RNOPE_TEST_TAG": tag})
        assert torchrun.wait(timeout=600) == -signal.SIGKILL
    workers = tagged_processes(tag)
    _, alive = psutil.wait_procs(workers, timeout=300)
    for leftover in alive:
        leftover.kill()
    output = (tmp_path / "torchrun.log").read_text()
    assert not alive, f"workers still running after their launcher died:\n{output[-3000:]}"
    assert f"launcher pid {torchrun.pid} is gone" in output, output[-3000:]
    status = exit_status(tmp_path)
    assert status["done"] is False and "launcher" in status["reason"], status
    stopped = status["iteration"]
    assert stopped >= 2 and status["checkpoint"].endswith(f"iter_{stopped:07d}")
    again = run(rnope_train(tmp_path, f"data.cache_dir={data_cache}", "train.iters=2000", "scheduler.warmup_iters=1",
                            f"train.stop_at={stopped + 1}"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints'}/iter_{stopped:07d} at iteration {stopped}" in again.stdout
    assert [m["iteration"] for m in metrics(tmp_path)] == list(range(1, stopped + 2))


# ----------------------------------------------------------------- 11: pre-emption during a gate

GATE = ["eval.interval=2", "eval.lengths=[128,256]", "eval.samples=2"]


def test_sigterm_during_an_eval_gate_saves_first_and_resumes_exactly(tmp_path, data_cache, saved_run):
    """SIGTERM to the trainer's process group after the first forward of the gate due at
    iteration 2 (6 forwards in all): the gate gives way, checkpoint 2 is saved, the run
    exits 0 saying the gate was cut short and logs no partial accuracy. The resumed run
    logs the gate at 4 and trains exactly as the reference run without gates (the gate
    never touches the trajectory)."""
    args = [f"data.cache_dir={data_cache}", *SAVED_RUN_ARGS, *GATE]
    out = run(rnope_train(tmp_path, *args), env={"RNOPE_FAULT": "term_group@in_gate:2"}, start_new_session=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "eval gate at iteration 2 cut short by SIGTERM: saving first" in out.stdout, out.stdout[-3000:]
    assert "stopped by SIGTERM at iteration 2" in out.stdout
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    assert [("eval" in m) for m in metrics(tmp_path)] == [False, False]
    again = run(rnope_train(tmp_path, *args))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints'}/iter_0000002 at iteration 2" in again.stdout
    records = metrics(tmp_path)
    assert [m["iteration"] for m in records] == [1, 2, 3, 4]
    assert set(records[-1]["eval"]["passkey"]) == {"128", "256"}
    assert losses(tmp_path) == losses(saved_run)


# ----------------------------------------------------------------- 6: YAML alias bombs

def _limit_memory(gib: int = 4):
    """An address-space cap for a refused command: a regression then fails fast
    (MemoryError) instead of swapping the machine. 4 GiB lets a recipe be read; a
    process group (gloo's threads) needs more address space (12 GiB)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (gib * 2**30, gib * 2**30))


def _limit_memory_with_process_group():
    _limit_memory(12)


def alias_bomb(levels: int = 9) -> str:
    """The classic "billion laughs" as a flow list: 9 lists of 9 aliases of the previous
    list, 9^9 strings when expanded (~400 bytes of YAML)."""
    names = "abcdefghijklmnop"[:levels]
    items = ["&a [" + ",".join(["lol"] * 9) + "]"]
    items += [f"&{cur} [" + ",".join([f"*{prev}"] * 9) + "]" for prev, cur in zip(names, names[1:])]
    return "[" + ", ".join(items) + "]"


@pytest.mark.parametrize("field", ["eval.tasks", "model.pattern", "cluster.gpu"])
def test_a_yaml_alias_bomb_in_a_recipe_is_refused_in_one_line(tmp_path, field):
    section, key = field.split(".")
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(f"base: {RECIPE}\n{section}:\n  {key}: {alias_bomb()}\n")
    before = tree_digest(tmp_path)
    out = run([console_script("rnope-train"), str(recipe), f"logging.run_dir={tmp_path / 'run'}"],
              preexec_fn=_limit_memory)
    assert_one_line_error(out, "rnope-train", str(recipe), "aliases expand to more than")
    assert tree_digest(tmp_path) == before  # nothing written, the recipe untouched


def test_a_yaml_alias_bomb_in_an_override_or_a_planned_recipe_is_refused(tmp_path):
    out = run([console_script("rnope-train"), RECIPE, f"eval.tasks={alias_bomb()}",
               f"logging.run_dir={tmp_path / 'run'}"], preexec_fn=_limit_memory)
    assert_one_line_error(out, "rnope-train", "override eval.tasks", "aliases expand to more than")
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(f"base: {RECIPE}\ncluster:\n  gpu: {alias_bomb()}\n")
    out = run([console_script("rnope-plan"), str(recipe)], preexec_fn=_limit_memory)
    assert_one_line_error(out, "rnope-plan", str(recipe), "aliases expand to more than")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]


# ----------------------------------------------------------------- 15, 16: rnope-plan

def test_rnope_plan_prints_no_library_warnings(tmp_path):
    """A plan is stdout only: megatron's and torch's import-time warnings stay out."""
    out = run([console_script("rnope-plan"), RECIPE])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr == ""


@pytest.mark.parametrize("gpu, tflops", [("h100", "50000"), ("b200", "2251")])
def test_rnope_plan_refuses_an_achieved_throughput_above_the_gpus_peak(gpu, tflops):
    out = run([console_script("rnope-plan"), RECIPE, "--gpu", gpu, "--achieved-tflops", tflops])
    assert_one_line_error(out, "rnope-plan", f"--achieved-tflops {tflops} is above the {gpu}'s dense bf16 peak")
    assert out.stdout == ""


# ----------------------------------------------------------------- 12, 14: rnope-eval --hf inputs

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama-class Hugging Face folder with vocab_size 100 and no tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _eval_hf(folder, *extra):
    return run([console_script("rnope-eval"), "passkey", "--hf", str(folder), "--lengths", "128", "--depths", "0",
                "--samples", "1", "--quiet", *extra])


def test_rnope_eval_hf_without_a_tokenizer_is_refused(llama_dir):
    """No tokenizer.json: the byte tokenizer is not guessed (it used to score with it)."""
    before = tree_digest(llama_dir)
    out = _eval_hf(llama_dir)
    assert_one_line_error(out, "rnope-eval", f"{llama_dir}: no tokenizer.json")
    assert tree_digest(llama_dir) == before


def test_rnope_eval_hf_with_a_tokenizer_larger_than_the_vocabulary_is_refused(llama_dir, tmp_path):
    """vocab_size 100 with the byte tokenizer (257 ids): one line, not an IndexError."""
    from rnope_megatron.convert.byte_tokenizer import write_byte_tokenizer

    folder = tmp_path / "llama"
    folder.mkdir()
    for item in llama_dir.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    write_byte_tokenizer(folder)
    before = tree_digest(folder)
    out = _eval_hf(folder)
    assert_one_line_error(out, "rnope-eval", "tokenizer.json has 257 ids > config.json vocab_size 100")
    assert tree_digest(folder) == before


@pytest.mark.parametrize("threads", ["-2", "0"])
def test_rnope_eval_refuses_a_thread_count_below_one(llama_dir, threads):
    out = _eval_hf(llama_dir, "--threads", threads)
    assert_one_line_error(out, "rnope-eval", f"--threads {threads} must be >= 1")


# ----------------------------------------------------------------- 9: evaluations that cannot fit

def _length_that_cannot_fit() -> int:
    """Four times the tokens whose logits alone (tiny recipe: vocab 512, float32) fill
    this machine's available memory: refused however the estimate's details change."""
    return 4 * psutil.virtual_memory().available // (512 * 4)


def test_rnope_eval_refuses_a_length_that_cannot_fit_before_any_work(saved_run, tmp_path):
    length = _length_that_cannot_fit()
    out = run([console_script("rnope-eval"), "passkey", "--checkpoint", str(saved_run / "checkpoints"),
               "--lengths", f"128,{length}", "--quiet", "--json", str(tmp_path / "out.json")],
              preexec_fn=_limit_memory_with_process_group)
    assert_one_line_error(out, "rnope-eval", f"--lengths: evaluating {length:,} tokens needs about", "GiB available")
    assert "length" not in out.stdout and not list(tmp_path.iterdir())


def test_an_eval_gate_that_cannot_fit_is_refused_before_training(tmp_path):
    """Refused at recipe validation (also by --check), before a process group, a run
    directory or a data cache exists: not after hours of training, at the first gate."""
    length = _length_that_cannot_fit()
    args = [RECIPE, "eval.interval=2", f"eval.lengths=[{length}]", f"logging.run_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}"]
    for cmd in ([console_script("rnope-train"), *args], [console_script("rnope-train"), "--check", *args]):
        out = run(cmd, preexec_fn=_limit_memory)
        assert_one_line_error(out, "rnope-train", "bad recipe: eval.lengths: evaluating", "GiB available")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------- 17: a bad recipe under torchrun

def test_a_bad_recipe_under_torchrun_is_reported_once(tmp_path):
    """Every rank finds the error before any process group; only rank 0 prints it (the
    others wait to be stopped by torchrun, so rank 0 is never stopped before it spoke),
    and no worker is left behind."""
    tag = uuid.uuid4().hex
    out = run([console_script("torchrun"), "--standalone", "--nproc-per-node=2", "--no-python",
               *rnope_train(tmp_path / "run", "model.window=-3")], env={"RNOPE_TEST_TAG": tag})
    assert out.returncode != 0
    said = (out.stdout + out.stderr).count("rnope-train: bad recipe: ")
    assert said == 1, out.stderr[-3000:]
    assert "window must be an integer >= 1, got -3" in out.stderr
    assert not (tmp_path / "run").exists()
    assert not tagged_processes(tag)


def test_rnope_train_launching_its_workers_refuses_a_bad_recipe_before_any_starts(tmp_path):
    """``rnope-train --nproc-per-node N ...`` validates for the whole world in the launching
    process: one line, no torchrun summary, no worker, nothing written."""
    tag = uuid.uuid4().hex
    # valid for one process, not for 3 (global batch 8 is not a multiple of 3 data-parallel ranks)
    out = run([console_script("rnope-train"), "--nproc-per-node", "3", "--standalone", RECIPE, *FAST,
               f"logging.run_dir={tmp_path / 'run'}"], env={"RNOPE_TEST_TAG": tag})
    assert_one_line_error(out, "rnope-train", "bad recipe: ", "global_batch_size")
    assert len(out.stderr.strip().splitlines()) == 1 and "ChildFailedError" not in out.stdout + out.stderr
    assert not (tmp_path / "run").exists() and not tagged_processes(tag)
    out = run([console_script("rnope-train"), "--nproc-per-node=gpu", RECIPE])
    assert_one_line_error(out, "rnope-train", "--nproc-per-node and --nnodes take whole numbers")


def test_rnope_train_launching_its_workers_trains_as_torchrun(tmp_path, data_cache, saved_run):
    """A valid recipe: rnope-train becomes torchrun with the same options (data parallel 2
    here) and follows the single-process trajectory (2e-4, as tests/test_train.py)."""
    out = run([console_script("rnope-train"), "--nproc-per-node=2", "--standalone",
               *rnope_train(tmp_path, f"data.cache_dir={data_cache}", *SAVED_RUN_ARGS)[1:]])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world 2 = tp 1 x pp 1 x cp 1 x dp 2" in out.stdout
    reference = losses(saved_run)
    assert losses(tmp_path).keys() == reference.keys()
    for iteration, loss in losses(tmp_path).items():
        assert loss == pytest.approx(reference[iteration], abs=2e-4)


def test_a_tokenizer_without_an_end_of_document_token_is_refused_in_one_line(tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1, "[UNK]": 2}, '
                         '"unk_token": "[UNK]"}, "pre_tokenizer": {"type": "Whitespace"}}')
    out = run(rnope_train(tmp_path / "run", f"data.tokenizer={tokenizer}", "data.document_mask=true"))
    assert_one_line_error(out, "rnope-train", f"bad recipe: data.tokenizer: {tokenizer}: no end-of-document token")
    assert not (tmp_path / "run").exists()
