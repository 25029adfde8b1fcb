"""Save and load a training engine's state: model chunks, optimizer, scheduler, RNG.

The engine is anything with ``model`` (Megatron DDP-wrapped chunks), ``optimizer``,
``scheduler``, ``recipe`` and ``optimizer_is_distributed`` (rnope-train's Engine).

Model and optimizer are saved sharded by global key, so a checkpoint loads under a
different TP/PP/VPP layout (dist-checkpointing reshards). The distributed optimizer's
state follows ``checkpoint.optimizer_format``: ``dp_reshardable`` (default) reshards DP
only, and a TP/PP change is refused with a message that names the way out. A checkpoint
whose model differs from the recipe's (pattern, sizes, ...) is refused naming the fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib

import torch
import torch.distributed as dist

from rnope_megatron.attention.native_cpu import kernel_in_use
from rnope_megatron.checkpoint.layout import FAILURES, CheckpointError, common_state, save_state, unreadable
from rnope_megatron.checkpoint.model_state import keep_what_the_checkpoint_holds, load_into
from rnope_megatron.checkpoint.quantizer_state import checkpoint_entries as quantizer_entries
from rnope_megatron.checkpoint.quantizer_state import restore_quantizers
from rnope_megatron.model.config import RNoPEConfig

# Model fields that may differ between a checkpoint and the run that loads it: the
# sequence length (a long-context stage, no RoPE rescaling), and settings that change
# no weight's meaning (initialisation, dropout).
MAY_CHANGE = ("max_seq_length", "init_method_std", "output_init_std", "hidden_dropout", "attention_dropout")


def chunk_keys(num_chunks: int) -> list[str]:
    """State-dict keys of the model chunks: ``model``, or ``model0``, ``model1``, ... with
    virtual pipeline stages (Megatron-LM's naming)."""
    return ["model"] if num_chunks == 1 else [f"model{index}" for index in range(num_chunks)]


def runtime_facts() -> dict:
    """What decides bit-exactness on CPU besides the state: torch's intra-op thread
    count and which sliding-window kernel runs. Recorded with each checkpoint."""
    return {"intra_op_threads": torch.get_num_threads(), "cpu_kernel": kernel_in_use()}


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


# Two optimizer checkpoint paths, by what Megatron's optimizer runs on:
# * TE's or Apex's FusedAdam (the GPU clusters' case: TE installed): Megatron's own save and
#   load, untouched; fully_reshardable loads.
# * torch's Adam (no TE/Apex: CPU, plain GPU installs) under the distributed optimizer:
#   megatron-core 0.19's save/load paths assume FusedAdam's state layout, so the two fixes
#   below (a step before the first load, the step restored after it) apply, and
#   fully_reshardable is refused at start (train/engine.py).
def uses_torch_adam_fixes(optimizer) -> bool:
    """Whether this optimizer's checkpoints take the torch-Adam path (see above)."""
    return any(True for _ in _torch_adams_under_distributed_optimizers(optimizer))


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

    keys = chunk_keys(len(engine.model))
    state: dict = {key: chunk.module.sharded_state_dict() for key, chunk in zip(keys, engine.model)}
    if with_optimizer:
        model_state = state["model"] if len(keys) == 1 else {key: state[key] for key in keys}
        state["optimizer"] = engine.optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata=_optimizer_metadata(optimizer_format),
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


def save_training_state(engine, directory, iteration: int, keep: int) -> pathlib.Path:
    """Save model, optimizer, scheduler, RNG and the iteration (which fixes the data
    position: batches are a pure function of it)."""
    optimizer_format = engine.recipe.checkpoint.optimizer_format
    state = _sharded_state(engine, is_loading=False, with_optimizer=True, rng=_rng_state(),
                           optimizer_format=optimizer_format)
    state["scheduler"] = engine.scheduler.state_dict()
    state["optimizer_format"] = optimizer_format
    # the whole recipe, so tools (rnope-convert, rnope-eval) can rebuild the model
    state["recipe"] = engine.recipe.to_dict()
    state["train_state"] = {"iteration": iteration, "layout": _layout(), "runtime": runtime_facts()}
    state.update(quantizer_entries([chunk.module for chunk in engine.model]))  # QAT: {} otherwise
    return save_state(state, directory, iteration, keep)


def _canonical(cfg) -> dict:
    """A model's fields with defaults resolved, so equivalent spellings compare equal
    (``num_query_groups: None`` = the head count, ``pattern: SSSG`` = ``SSSGSSSG``, ...)."""
    values = dataclasses.asdict(cfg)
    values.update(num_query_groups=cfg.query_groups, kv_channels=cfg.head_dim, ffn_hidden_size=cfg.ffn_size,
                  pattern=cfg.layer_pattern.layers, global_rope_theta=cfg.global_rope_theta or cfg.rope_theta)
    return values


def architecture_differences(saved_model: dict, model) -> list[str]:
    """``field: saved -> now`` for every model field that differs, except :data:`MAY_CHANGE`."""
    saved, now = _canonical(RNoPEConfig.from_dict(saved_model)), _canonical(model)
    return [f"model.{name}: {saved[name]!r} -> {now[name]!r}"
            for name in now if name not in MAY_CHANGE and saved.get(name) != now[name]]


def check_architecture(path: pathlib.Path, saved_recipe: dict | None, model) -> None:
    """Refuse a checkpoint whose model is not the recipe's (one line naming the fields)."""
    if not saved_recipe or "model" not in saved_recipe:
        return  # weights written by another tool: the tensor shapes are checked on load
    changed = architecture_differences(saved_recipe["model"], model)
    if changed:
        raise CheckpointError(
            f"{path} holds another model than this recipe ({'; '.join(changed)}): set these fields back, "
            "or train in a new run directory (only model.max_seq_length may change between stages)")


def _warn_if_runtime_changed(saved: dict, rank0: bool) -> None:
    before, now = saved.get("runtime"), runtime_facts()
    if rank0 and before and before != now:
        changes = ", ".join(f"{k} {before.get(k)} -> {now[k]}" for k in now if before.get(k) != now[k])
        print(f"warning: resuming with {changes}: CPU results stay correct but are no longer bit-identical "
              "to an uninterrupted run (set train.cpu_threads / RNOPE_SWA_CPU_KERNEL as saved)", flush=True)


def load_training_state(engine, path, weights_only: bool = False) -> dict:
    """Load a checkpoint into the engine. ``weights_only`` keeps the fresh optimizer,
    scheduler and RNG (a new training stage). Returns the saved train_state (or {})."""
    from megatron.core import dist_checkpointing

    path = pathlib.Path(path)
    common = common_state(path)
    check_architecture(path, common.get("recipe"), engine.recipe.model)
    # quantizers first (QAT): the load request below then holds their calibrated tensors
    restore_quantizers([chunk.module for chunk in engine.model], common, path)
    if not weights_only and "optimizer" not in common:
        raise CheckpointError(f"{path} holds weights only (e.g. from rnope-convert from-hf): "
                              "set checkpoint.reset_optimizer=true")
    saved = common.get("train_state") or {}
    # RNG streams belong to (pp, tp) positions: they restore only into the same layout.
    # Model and optimizer reshard; with dropout off the RNG does not affect training.
    same_layout = saved.get("layout") == _layout()
    optimizer_format = common.get("optimizer_format", "dp_reshardable")  # as saved
    if not weights_only and not same_layout and optimizer_format == "dp_reshardable" \
            and engine.optimizer_is_distributed:
        raise CheckpointError(
            f"{path} was saved with checkpoint.optimizer_format=dp_reshardable under layout "
            f"{saved.get('layout')}, which resumes only under the same TP/PP (this run: {_layout()}). "
            "Resume with the saved layout, or load weights only with checkpoint.reset_optimizer=true")
    if not weights_only:
        _give_fresh_torch_adam_a_step(engine.optimizer)
    state = _sharded_state(engine, is_loading=True, with_optimizer=not weights_only, rng=None,
                           with_rng=same_layout, optimizer_format=optimizer_format)
    keys = chunk_keys(len(engine.model))
    # a checkpoint of the other attention backend: see model_state
    for key, request in zip(keys, keep_what_the_checkpoint_holds([state[k] for k in keys], path)):
        state[key] = request
    if not weights_only:
        state["scheduler"] = None
        state["train_state"] = None
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except FAILURES as err:  # a damaged shard: name it, list what else is there
        raise unreadable(path, err) from None
    for key, chunk in zip(keys, engine.model):
        load_into(chunk.module, loaded[key])
    if weights_only:
        # bf16/fp16 and the distributed optimizer keep fp32 main copies taken at
        # construction; refresh them or the first step writes the old weights back.
        engine.optimizer.reload_model_params()
        return {}
    with torch.no_grad():  # fp32 main params are views of leaf params (dp_reshardable copies into them)
        engine.optimizer.load_state_dict(loaded["optimizer"])
    _restore_torch_adam_steps(engine.optimizer)
    engine.scheduler.load_state_dict(loaded["scheduler"])
    rank0 = dist.get_rank() == 0
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    elif rank0:
        print(f"note: checkpoint layout {saved.get('layout')} differs from {_layout()}: model and optimizer "
              "were resharded; RNG streams start fresh", flush=True)
    _warn_if_runtime_changed(saved, rank0)
    return loaded["train_state"]


def state_digest(engine) -> str:
    """SHA-256 over every rank's parameters and optimizer state (in a fixed order): two
    runs that end with equal digests hold bit-identical training states."""
    digest = hashlib.sha256()

    def add(tensor: torch.Tensor) -> None:
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

    for chunk in engine.model:
        for name, tensor in sorted(chunk.module.state_dict().items()):
            if isinstance(tensor, torch.Tensor) and not name.endswith("_extra_state"):
                digest.update(name.encode())
                add(tensor)
    for megatron_optimizer in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer]):
        torch_optimizer = megatron_optimizer.optimizer
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                for key, value in sorted(torch_optimizer.state[param].items()):
                    digest.update(key.encode())
                    add(value if isinstance(value, torch.Tensor) else torch.tensor(float(value)))
    digest.update(str(engine.scheduler.num_steps).encode())
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, digest.hexdigest())
    return hashlib.sha256("".join(per_rank).encode()).hexdigest()
