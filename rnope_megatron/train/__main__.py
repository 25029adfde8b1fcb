"""``rnope-train RECIPE.yaml [section.key=value ...]`` (or ``python -m rnope_megatron.train``).

Single process on a laptop CPU, or under ``torchrun`` on many GPUs: same command.
Resumes automatically from ``checkpoint.dir/latest``; SIGTERM / SIGUSR1 (SLURM
pre-emption) save a checkpoint at the end of the current iteration and exit 0.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys


class _StopRequest:
    """Turns SIGTERM/SIGUSR1 into a flag checked between iterations."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal = signal.Signals(signum).name

    def any_rank(self) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.signal else 0.0])
        if torch.cuda.is_available():
            flag = flag.cuda()
        dist.all_reduce(flag)  # every rank stops at the same iteration
        return bool(flag.item())


def run(recipe) -> dict:
    """Train ``recipe`` on this rank (process groups are created here). Returns a summary."""
    import torch.distributed as dist

    from rnope_megatron.distributed import initialize_parallel
    from rnope_megatron.flops import training_flops_per_token
    from rnope_megatron.train import checkpoint as ckpt
    from rnope_megatron.train.data import build_dataset
    from rnope_megatron.train.engine import Engine
    from rnope_megatron.train.metrics import MetricsLogger
    from rnope_megatron.train.recipe import data_parallel_size, validate

    stop = _StopRequest()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    validate(recipe, world_size)  # before any process group exists
    dp = data_parallel_size(recipe, world_size)
    initialize_parallel(recipe.parallel, seed=recipe.train.seed)
    rank0 = dist.get_rank() == 0
    t = recipe.train

    engine = Engine(recipe, dp)
    start_iteration = 0
    resume = ckpt.latest_checkpoint(recipe.checkpoint_dir)
    if resume is not None:
        state = ckpt.load(engine, resume)
        start_iteration = state["iteration"]
        if rank0:
            print(f"resumed from {resume} at iteration {start_iteration}", flush=True)
    elif recipe.checkpoint.load:
        source = ckpt.latest_checkpoint(recipe.checkpoint.load) or recipe.checkpoint.load
        state = ckpt.load(engine, source, weights_only=recipe.checkpoint.reset_optimizer)
        start_iteration = 0 if recipe.checkpoint.reset_optimizer else state["iteration"]
        if rank0:
            mode = "weights only" if recipe.checkpoint.reset_optimizer else "full state"
            print(f"initialised from {source} ({mode}) at iteration {start_iteration}", flush=True)

    cache = pathlib.Path(recipe.data.cache_dir or recipe.run_dir / "data")
    dataset = build_dataset(recipe, cache, t.iters * t.global_batch_size)
    logger = MetricsLogger(
        recipe.run_dir, t.iters, start_iteration, training_flops_per_token(recipe.model, t.seq_length), world_size,
        recipe.logging.peak_tflops, recipe.logging.tensorboard, active=rank0,
    )
    if rank0:
        params = sum(p.numel() for m in engine.model for p in m.parameters())
        print(f"rnope-train: world {world_size} = tp {recipe.parallel.tensor} x pp {recipe.parallel.pipeline}"
              f" x cp {recipe.parallel.context} x dp {dp}; {params / 1e6:.2f}M params on rank 0; "
              f"{t.iters} iters x {t.global_batch_size} x {t.seq_length} tokens", flush=True)
        print(recipe.model.layer_pattern.describe(), flush=True)

    skips = 0
    iteration = start_iteration
    reason = "done"
    while iteration < t.iters:
        result = engine.train_step(dataset, iteration)
        iteration += 1
        logger.add_tokens(result.tokens)
        if result.skipped:
            skips += 1
            if skips > t.max_nan_skips:
                logger.log(iteration, result.loss, result.lr, result.grad_norm, True)
                raise SystemExit(
                    f"rnope-train: non-finite loss {result.loss} / grad norm {result.grad_norm} at iteration "
                    f"{iteration} (train.max_nan_skips={t.max_nan_skips} exhausted); last checkpoint: "
                    f"{ckpt.latest_checkpoint(recipe.checkpoint_dir)}"
                )
        if iteration % recipe.logging.interval == 0 or iteration == t.iters or result.skipped:
            logger.log(iteration, result.loss, result.lr, result.grad_norm, result.skipped)
        stopping = stop.any_rank() or iteration == t.stop_at
        if iteration % recipe.checkpoint.interval == 0 or iteration == t.iters or stopping:
            path = ckpt.save(engine, recipe.checkpoint_dir, iteration, recipe.checkpoint.keep)
            logger.restart_window()  # keep the save's time out of tokens/s
            if rank0:
                print(f"saved checkpoint {path}", flush=True)
        if stopping:
            reason = "stopped at train.stop_at" if iteration == t.stop_at else (
                f"stopped by {stop.signal or 'a signal on another rank'}")
            break
    logger.close()
    latest = ckpt.latest_checkpoint(recipe.checkpoint_dir)
    summary = {
        "iteration": iteration, "reason": reason, "done": iteration >= t.iters, "run_dir": str(recipe.run_dir),
        "checkpoint": str(latest) if latest else None,
        "metrics": str(recipe.run_dir / "metrics.jsonl"), "tensorboard": logger.tensorboard_dir,
    }
    if rank0:
        # for job scripts: e.g. requeue a pre-empted SLURM job unless "done" is true
        (recipe.run_dir / "exit_status.json").write_text(json.dumps(summary) + "\n")
        print(f"rnope-train: {reason} at iteration {iteration}; checkpoint {summary['checkpoint']}; "
              f"metrics {summary['metrics']}; tensorboard {summary['tensorboard'] or 'not installed'}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return summary


def main(argv=None) -> None:
    from rnope_megatron.train.recipe import RecipeError, load_recipe

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    try:
        recipe = load_recipe(argv[0], argv[1:])
    except RecipeError as err:
        raise SystemExit(f"rnope-train: bad recipe: {err}") from None
    run(recipe)


if __name__ == "__main__":
    main()
