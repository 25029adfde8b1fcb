"""The training loop, read top to bottom: set up, restore, train, finish.

:func:`run` is what ``rnope-train`` runs on every rank. Checkpoints are saved every
``checkpoint.interval`` iterations, at the end, at ``train.stop_at`` and when SIGTERM or
SIGUSR1 arrive (SLURM pre-emption, ``timeout``, a scheduler signalling the whole process
group): the run then saves at the end of the current iteration and exits 0, writing
``<run_dir>/exit_status.json`` (``done`` false: requeue it).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from rnope_megatron.checkpoint.layout import common_state, latest_checkpoint
from rnope_megatron.checkpoint.quantizer_state import is_quantized, quantized_weights_only
from rnope_megatron.checkpoint.training_state import load_training_state, save_training_state, state_digest
from rnope_megatron.common import faults
from rnope_megatron.common.distributed import compute_device, initialize_parallel
from rnope_megatron.data.dataset import SampleShape, build_dataset
from rnope_megatron.eval.gate import EvalGate
from rnope_megatron.model.flops import training_flops_per_token
from rnope_megatron.recipe.validation import data_parallel_size
from rnope_megatron.train.console import describe_attention
from rnope_megatron.train.engine import Engine
from rnope_megatron.train.metrics import MetricsLogger
from rnope_megatron.train.run_lock import RunDirectoryBusy, TrainerLocks


class StopRequest:
    """Turns SIGTERM/SIGUSR1, and the death of the torchrun launcher, into a flag checked
    between iterations (and between an eval gate's batches)."""

    # Why a rank stops, as a number every rank can agree on (the largest wins): a rank
    # whose own flag is clear then still says why the run stopped.
    CAUSES = ("", "SIGTERM", "SIGUSR1", "the death of its launcher")

    def __init__(self):
        self.signal = None
        self.cause = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal = signal.Signals(signum).name
        self.cause = max(self.cause, self.CAUSES.index(self.signal))

    def watch_launcher(self, poll_s: float = 1.0) -> None:
        """Under torchrun, stop when the launcher dies. A ``kill -9`` of torchrun leaves its
        workers running, holding the run's locks and training on (torchrun forwards
        SIGTERM to them, but nothing forwards its own death). Workers are torchrun's
        children: when it is gone they are re-parented, so ``getppid()`` changes."""
        if "TORCHELASTIC_RUN_ID" not in os.environ:
            return
        launcher = os.getppid()

        def watch():
            while os.getppid() == launcher:
                time.sleep(poll_s)
            self.signal = f"the death of its launcher (pid {launcher})"
            self.cause = self.CAUSES.index("the death of its launcher")
            print(f"rnope-train: rank {os.environ.get('RANK', '?')}: launcher pid {launcher} is gone: saving a "
                  f"checkpoint at the end of this iteration and stopping", file=sys.stderr, flush=True)

        threading.Thread(target=watch, name="rnope-launcher-watch", daemon=True).start()

    def any_rank(self) -> bool:
        flag = torch.tensor([float(self.cause)], device=compute_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same iteration
        cause = int(flag.item())
        if cause and not self.signal:
            self.signal = f"{self.CAUSES[cause]} (seen by another rank)"
        return bool(cause)


def _pin_threads(cpu_threads: int | None) -> None:
    """A fixed intra-op thread count: CPU reductions (GEMMs) may split work by it, so a
    run and its resumption must use the same one to stay bit-identical."""
    if cpu_threads is not None and not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads)


def _lock_run_directory(recipe, rank0: bool) -> TrainerLocks | None:
    """Rank 0 locks the run and checkpoint directories; every rank learns whether it got
    them (before anything is read or written there)."""
    locks = TrainerLocks(recipe) if rank0 else None
    busy = locks.try_acquire() if locks else None
    flag = torch.tensor([1.0 if busy else 0.0], device=compute_device())
    dist.all_reduce(flag)
    if flag.item():
        raise RunDirectoryBusy(busy or "the run or checkpoint directory is in use by another rnope-train "
                                       "(see rank 0)")
    return locks


def restore(engine, recipe, rank0: bool) -> int:
    """Resume from the run's own ``latest``, else start from ``checkpoint.load`` (a new
    stage), else from scratch. Returns the iteration to continue from."""
    resume = latest_checkpoint(recipe.checkpoint_dir)
    if resume is not None:
        state = load_training_state(engine, resume)
        if rank0:
            print(f"resumed from {resume} at iteration {state['iteration']}", flush=True)
        return state["iteration"]
    if recipe.checkpoint.load:
        source = latest_checkpoint(recipe.checkpoint.load) or pathlib.Path(recipe.checkpoint.load)
        # rnope-quantize's output holds no optimizer: QAT starts a fresh one
        weights_only = recipe.checkpoint.reset_optimizer or quantized_weights_only(common_state(source))
        state = load_training_state(engine, source, weights_only=weights_only)
        start = 0 if weights_only else state["iteration"]
        if rank0:
            mode = "weights only" if weights_only else "full state"
            if is_quantized(engine.model[0].module):
                mode += ", with its quantizers: quantization-aware training"
            print(f"initialised from {source} ({mode}) at iteration {start}", flush=True)
        return start
    return 0


def train(engine, dataset, logger, stop: StopRequest, start_iteration: int, gate=None) -> tuple[int, str]:
    """Step, log and save until ``train.iters``, ``train.stop_at`` or a stop signal; run
    the eval ``gate`` (if any) when due. Returns (last iteration, why it ended)."""
    recipe, t = engine.recipe, engine.recipe.train
    rank0 = dist.get_rank() == 0
    skips, iteration = 0, start_iteration
    while iteration < t.iters:
        result = engine.train_step(dataset, iteration)
        iteration += 1
        logger.add_tokens(result.tokens, result.flops, result.documents)
        if result.skipped:
            skips += 1
            if skips > t.max_nan_skips:
                logger.log(iteration, result.loss, result.lr, result.grad_norm, True)
                raise SystemExit(
                    f"rnope-train: non-finite loss {result.loss} / grad norm {result.grad_norm} at iteration "
                    f"{iteration} (train.max_nan_skips={t.max_nan_skips} exhausted); last checkpoint: "
                    f"{latest_checkpoint(recipe.checkpoint_dir)}")
        evaluation = None
        if gate is not None and gate.due(iteration):
            started = time.time()
            evaluation = gate.run(iteration, stop.any_rank)  # gives way to a stop signal
            logger.exclude_time(time.time() - started)  # keep the gate's time out of tokens/s
            if evaluation is None and rank0:
                print(f"rnope-train: eval gate at iteration {iteration} cut short by "
                      f"{stop.signal or 'a signal on another rank'}: saving first (not logged; "
                      f"rnope-eval on the checkpoint gives its numbers)", flush=True)
        logged = (iteration % recipe.logging.interval == 0 or iteration == t.iters or result.skipped
                  or evaluation is not None)
        if logged:
            # a digest per record (train.state_digest): a divergence is located to its iteration
            digest = state_digest(engine) if t.state_digest else None  # collective: every rank
            logger.log(iteration, result.loss, result.lr, result.grad_norm, result.skipped, evaluation, digest)
        faults.point("after_step", iteration)
        stopping = stop.any_rank() or iteration == t.stop_at
        if iteration % recipe.checkpoint.interval == 0 or iteration == t.iters or stopping:
            if not logged:  # a record at every checkpoint: a resume never skips unlogged tokens
                logger.log(iteration, result.loss, result.lr, result.grad_norm, result.skipped,
                           state_digest=state_digest(engine) if t.state_digest else None)
            started = time.time()
            path = save_training_state(engine, recipe.checkpoint_dir, iteration, recipe.checkpoint.keep)
            logger.exclude_time(time.time() - started)  # keep the save's time out of tokens/s
            if rank0:
                print(f"saved checkpoint {path}", flush=True)
        if stopping:
            return iteration, ("stopped at train.stop_at" if iteration == t.stop_at
                               else f"stopped by {stop.signal or 'a signal on another rank'}")
    return iteration, "done"


def _write_exit_status(run_dir: pathlib.Path, summary: dict) -> None:
    # for job scripts: e.g. requeue a pre-empted SLURM job unless "done" is true
    tmp = run_dir / "exit_status.json.tmp"
    tmp.write_text(json.dumps(summary) + "\n")
    tmp.replace(run_dir / "exit_status.json")


def run(recipe) -> dict:
    """Train ``recipe`` on this rank (process groups are created here). Returns a summary.
    The recipe comes validated, with this run's world size (``rnope-train`` does it:
    :func:`rnope_megatron.recipe.validation.validate`)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    dp = data_parallel_size(recipe, world_size)
    stop = StopRequest()
    stop.watch_launcher()
    _pin_threads(recipe.train.cpu_threads)
    initialize_parallel(recipe.parallel, seed=recipe.train.seed)
    rank0 = dist.get_rank() == 0
    t = recipe.train
    lock = _lock_run_directory(recipe, rank0)
    try:
        engine = Engine(recipe, dp)
        start_iteration = restore(engine, recipe, rank0)
        cache = pathlib.Path(recipe.data.cache_dir or recipe.run_dir / "data")
        dataset = build_dataset(recipe.data, SampleShape.of(recipe), cache, t.iters * t.global_batch_size)
        logger = MetricsLogger(
            recipe.run_dir, t.iters, start_iteration, training_flops_per_token(recipe.model, t.seq_length),
            world_size, recipe.logging.peak_tflops, recipe.logging.tensorboard, active=rank0,
            wandb=recipe.logging.wandb, config=recipe.to_dict(),
        )
        if rank0:
            params = sum(p.numel() for m in engine.model for p in m.parameters())
            print(f"rnope-train: world {world_size} = tp {recipe.parallel.tensor} x pp {recipe.parallel.pipeline}"
                  f" x cp {recipe.parallel.context} x dp {dp}; {params / 1e6:.2f}M params on rank 0; "
                  f"{t.iters} iters x {t.global_batch_size} x {t.seq_length} tokens", flush=True)
            print(recipe.model.layer_pattern.describe(), flush=True)
            print(describe_attention(recipe.model, t.backend, engine.precision), flush=True)

        gate = None
        if recipe.eval.interval:
            gate = EvalGate(recipe, engine.model, compute_device())
        iteration, reason = train(engine, dataset, logger, stop, start_iteration, gate)
        wandb = logger.describe_wandb()
        logger.close()
        latest = latest_checkpoint(recipe.checkpoint_dir)
        summary = {
            "iteration": iteration, "reason": reason, "done": iteration >= t.iters, "run_dir": str(recipe.run_dir),
            "checkpoint": str(latest) if latest else None,
            "metrics": str(recipe.run_dir / "metrics.jsonl"), "tensorboard": logger.tensorboard_dir,
        }
        if t.state_digest:
            summary["state_digest"] = state_digest(engine)
        if rank0:
            _write_exit_status(recipe.run_dir, summary)
            digest = f"; state digest {summary['state_digest']}" if t.state_digest else ""
            print(f"rnope-train: {reason} at iteration {iteration}; checkpoint {summary['checkpoint']}; "
                  f"metrics {summary['metrics']}; tensorboard {logger.describe_tensorboard()}"
                  + (f"; wandb {wandb}" if wandb else "") + digest, flush=True)
        dist.barrier()
    finally:
        if lock is not None:
            lock.release()
    return summary
