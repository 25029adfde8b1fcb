"""Read and write rnope-train checkpoints tensor by tensor (for conversion and evaluation).

A checkpoint stores every weight under its global key (layers stacked on a leading axis),
whatever TP/PP/VPP it was saved with. A TP=PP=1 model built on the *meta* device gives,
for every state-dict name, the ShardedTensor that addresses it (key, layer offset, shape)
without allocating weights; loading a handful of names at a time through
dist-checkpointing reads only their bytes, so peak memory stays near one layer.
"""

from __future__ import annotations

import pathlib

import torch

from rnope_megatron.config import ParallelLayout, RNoPEConfig


def single_process() -> None:
    """A one-rank process group and Megatron state (TP=PP=1), CPU compat on."""
    import torch.distributed as dist

    from rnope_megatron.distributed import initialize_parallel

    if not dist.is_initialized():
        initialize_parallel(ParallelLayout())


def resolve(path) -> pathlib.Path:
    """A checkpoint directory: ``iter_N`` itself, or a run's dir holding ``latest``."""
    from rnope_megatron.train.checkpoint import latest_checkpoint

    path = pathlib.Path(path)
    if (path / "metadata.json").is_file():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise FileNotFoundError(f"{path}: no checkpoint (neither metadata.json nor a 'latest' marker)")
    return found


def recipe_of(path) -> dict:
    """The recipe dict saved with the checkpoint."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(resolve(path)))
    if "recipe" not in common:
        raise ValueError(f"{path}: checkpoint has no recipe (not written by rnope-train / rnope-convert)")
    return common["recipe"]


def model_config_of(path) -> RNoPEConfig:
    return RNoPEConfig.from_dict(recipe_of(path)["model"])


def build_tp1_model(cfg: RNoPEConfig, meta: bool = False):
    from rnope_megatron.model import build_model

    config = cfg.to_transformer_config(init_model_with_meta_device=meta, perform_initialization=not meta)
    return build_model(cfg, config)


class CheckpointReader:
    """Loads named TP=1 tensors from a checkpoint, a layer at a time.

    The meta-device model maps each state-dict name to its checkpoint key; layer weights
    are stacked under one key with the layer on axis 0, so one layer is requested as the
    [i:i+1] slice of that global tensor (the layout is the same whatever TP/PP saved it)."""

    def __init__(self, path, cfg: RNoPEConfig):
        from megatron.core import dist_checkpointing

        self.path = resolve(path)
        view = build_tp1_model(cfg, meta=True).sharded_state_dict()
        self.keys = {name: item.key for name, item in view.items() if not name.endswith("_extra_state")}
        self.meta = dist_checkpointing.load_tensors_metadata(str(self.path))

    def names(self) -> list[str]:
        return list(self.keys)

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        request = {}
        for name in names:
            if name not in self.keys:
                raise KeyError(f"{name} is not a weight of this model")
            key = self.keys[name]
            if key not in self.meta:
                raise KeyError(f"checkpoint {self.path} has no tensor {key} (truncated or another model?)")
            info = self.meta[key]
            shape, dtype = tuple(info.global_shape), info.dtype
            if name.startswith("decoder.layers."):
                layer = int(name.split(".")[2])
                request[name] = ShardedTensor.from_rank_offsets(
                    key, torch.empty((1,) + shape[1:], dtype=dtype), (0, layer, shape[0]), replica_id=0)
            else:
                request[name] = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=dtype), replica_id=0)
        # A subset (one layer of a stacked key) on purpose: skip the whole-tensor coverage check.
        loaded = dist_checkpointing.load(request, str(self.path), validate_access_integrity=False)
        return {name: loaded[name][0] if name.startswith("decoder.layers.") else loaded[name] for name in names}


def write_weights_checkpoint(cfg: RNoPEConfig, state: dict, out_dir, recipe: dict) -> pathlib.Path:
    """Build a TP=1 model holding ``state`` and save it as a weights-only checkpoint
    (``iter_0000000`` + ``latest``) that rnope-train loads with checkpoint.load."""
    from rnope_megatron.train.checkpoint import save_state

    model = build_tp1_model(cfg)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not fit the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    return save_state({"model": model.sharded_state_dict(), "recipe": recipe}, out_dir, 0, keep=1)
