"""Checkpoints with Megatron dist-checkpointing (torch_dist format).

Layout of ``checkpoint.dir``::

    iter_0000040/      one complete checkpoint (renamed into place only when whole)
    iter_0000050/
    latest             text file naming the newest complete checkpoint (atomic replace)

A save writes ``iter_N.tmp/`` on every rank, barriers, then rank 0 renames it to
``iter_N/`` and atomically replaces ``latest``: a crash at any point leaves ``latest``
naming an older, complete checkpoint. The newest ``keep`` checkpoints are kept.
Model and optimizer are saved sharded by global key, so a checkpoint loads under a
different TP/PP/VPP layout (dist-checkpointing reshards). The distributed optimizer's
state follows ``checkpoint.optimizer_format``: ``dp_reshardable`` (default) reshards DP
only, and a TP/PP change is refused with a message that names the way out.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import torch
import torch.distributed as dist

LATEST = "latest"


def _name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def latest_checkpoint(directory) -> pathlib.Path | None:
    """The checkpoint ``latest`` points to, or None. A dangling marker is an error."""
    directory = pathlib.Path(directory)
    marker = directory / LATEST
    if not marker.is_file():
        return None
    target = directory / marker.read_text().strip()
    if not (target / "metadata.json").is_file():
        raise RuntimeError(f"{marker} names {target.name}, which is not a complete checkpoint")
    return target


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _layout() -> dict:
    from megatron.core import parallel_state

    return {
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
    }


def _optimizer_metadata(optimizer_format: str) -> dict:
    """What Megatron's optimizers read to lay out their sharded state. Without it the
    distributed optimizer picks its deprecated ``fully_sharded_model_space`` format, which
    megatron-core 0.19 cannot save ("ShardedTensor.flattened_range is not supported")."""
    return {"distrib_optim_sharding_type": optimizer_format, "chained_optim_avoid_prefix": True}


def _torch_adams_under_distributed_optimizers(optimizer):
    """The torch Adam inside each DistributedOptimizer, when TE/Apex are absent (then
    Megatron falls back to torch's Adam, whose checkpoint paths below need help)."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for megatron_optimizer in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(megatron_optimizer, distrib_optimizer.DistributedOptimizer):
            yield megatron_optimizer.optimizer


def _give_fresh_torch_adam_a_step(optimizer) -> None:
    """Building the load-time sharded state of megatron-core 0.19's DistributedOptimizer
    reads every torch-Adam state's ``step``, which torch creates only at the first step:
    loading into a fresh optimizer failed an assert. Create the zero state torch itself
    would create; the load overwrites it."""
    for adam in _torch_adams_under_distributed_optimizers(optimizer):
        for group in adam.param_groups:
            for param in group["params"]:
                state = adam.state[param]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0)
                    state.setdefault("exp_avg", torch.zeros_like(param))
                    state.setdefault("exp_avg_sq", torch.zeros_like(param))


def _restore_torch_adam_steps(optimizer) -> None:
    """megatron-core 0.19's DistributedOptimizer.load_state_dict gives every parameter's
    torch-Adam state one shared ``step`` tensor, then overwrites it with the step found in
    the dp_reshardable tensors, which is the load template's zero: Adam's bias correction
    restarted after every resume (losses diverged from the second iteration after it).
    The true step is in each param group, where Megatron saved it for torch's Adam; each
    state gets its own copy of it (torch increments them in place)."""
    for adam in _torch_adams_under_distributed_optimizers(optimizer):
        for group in adam.param_groups:
            for param in group["params"]:
                if "step" in group and "step" in adam.state[param]:
                    adam.state[param]["step"] = torch.tensor(float(group["step"]))


def _sharded_state(engine, is_loading: bool, with_optimizer: bool, rng: dict | None,
                   with_rng: bool = True, optimizer_format: str = "dp_reshardable") -> dict:
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state: dict = {}
    if len(engine.model) == 1:
        state["model"] = engine.model[0].module.sharded_state_dict()
    else:
        for index, chunk in enumerate(engine.model):
            state[f"model{index}"] = chunk.module.sharded_state_dict()
    if with_optimizer:
        model_state = {k: v for k, v in state.items() if k.startswith("model")}
        state["optimizer"] = engine.optimizer.sharded_state_dict(
            model_state if len(engine.model) > 1 else model_state["model"], is_loading=is_loading,
            metadata=_optimizer_metadata(optimizer_format),
        )
    if with_optimizer and with_rng:
        # RNG per (pp, tp) position; data-parallel replicas hold copies.
        pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
        state["rng_state"] = ShardedObject(
            "rng_state", rng,
            (parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size()),
            (pp, tp), replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
        )
    return state


def save(engine, directory, iteration: int, keep: int) -> pathlib.Path:
    """Save model, optimizer, scheduler, RNG and the iteration (which fixes the data
    position: batches are a pure function of it)."""
    optimizer_format = engine.recipe.checkpoint.optimizer_format
    state = _sharded_state(engine, is_loading=False, with_optimizer=True, rng=_rng_state(),
                           optimizer_format=optimizer_format)
    state["scheduler"] = engine.scheduler.state_dict()
    state["optimizer_format"] = optimizer_format
    # the whole recipe, so tools (rnope-convert, rnope-eval) can rebuild the model
    state["recipe"] = engine.recipe.to_dict()
    return save_state(state, directory, iteration, keep)


def save_state(state: dict, directory, iteration: int, keep: int) -> pathlib.Path:
    """Write a sharded state dict as ``iter_N`` (atomically, see module docstring)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    directory = pathlib.Path(directory)
    final = directory / _name(iteration)
    tmp = directory / (_name(iteration) + ".tmp")
    rank0 = dist.get_rank() == 0
    if rank0:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    state["train_state"] = {"iteration": iteration, "layout": _layout()}
    dist_checkpointing.save(state, str(tmp), sharded_strategy=get_default_save_sharded_strategy("torch_dist"))
    dist.barrier()
    if rank0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        marker_tmp = directory / (LATEST + ".tmp")
        marker_tmp.write_text(final.name + "\n")
        with open(marker_tmp) as f:
            os.fsync(f.fileno())
        marker_tmp.replace(directory / LATEST)
        _prune(directory, keep)
    dist.barrier()
    return final


def _prune(directory: pathlib.Path, keep: int) -> None:
    done = sorted(p for p in directory.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob("iter_*.tmp"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)


def load(engine, path, weights_only: bool = False) -> dict:
    """Load a checkpoint into the engine. ``weights_only`` keeps the fresh optimizer,
    scheduler and RNG (a new training stage). Returns the saved train_state (or {})."""
    from megatron.core import dist_checkpointing

    path = pathlib.Path(path)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path} is not a dist-checkpointing checkpoint (no metadata.json)")
    # RNG streams belong to (pp, tp) positions: they restore only into the same layout.
    # Model and optimizer reshard; with dropout off the RNG does not affect training.
    common = dist_checkpointing.load_common_state_dict(str(path))
    if not weights_only and "optimizer" not in common:
        raise ValueError(f"{path} holds weights only (e.g. from rnope-convert from-hf): "
                         "set checkpoint.reset_optimizer=true")
    saved = common.get("train_state") or {}
    same_layout = saved.get("layout") == _layout()
    optimizer_format = common.get("optimizer_format", "dp_reshardable")  # as saved
    if not weights_only and not same_layout and optimizer_format == "dp_reshardable" \
            and engine.optimizer_is_distributed:
        raise ValueError(
            f"{path} was saved with checkpoint.optimizer_format=dp_reshardable under layout "
            f"{saved.get('layout')}, which resumes only under the same TP/PP (this run: {_layout()}). "
            "Resume with the saved layout, or load weights only with checkpoint.reset_optimizer=true")
    if not weights_only:
        _give_fresh_torch_adam_a_step(engine.optimizer)
    state = _sharded_state(engine, is_loading=True, with_optimizer=not weights_only, rng=None,
                           with_rng=same_layout, optimizer_format=optimizer_format)
    if not weights_only:
        state["scheduler"] = None
        state["train_state"] = None
    loaded = dist_checkpointing.load(state, str(path))
    if len(engine.model) == 1:
        engine.model[0].module.load_state_dict(loaded["model"])
    else:
        for index, chunk in enumerate(engine.model):
            chunk.module.load_state_dict(loaded[f"model{index}"])
    if weights_only:
        # bf16/fp16 and the distributed optimizer keep fp32 main copies taken at
        # construction; refresh them or the first step writes the old weights back.
        engine.optimizer.reload_model_params()
        return {}
    with torch.no_grad():  # fp32 main params are views of leaf params (dp_reshardable copies into them)
        engine.optimizer.load_state_dict(loaded["optimizer"])
    _restore_torch_adam_steps(engine.optimizer)
    engine.scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    elif dist.get_rank() == 0:
        print(f"note: checkpoint layout {saved.get('layout')} differs from {_layout()}: model and optimizer "
              "were resharded; RNG streams start fresh", flush=True)
    return loaded["train_state"]
