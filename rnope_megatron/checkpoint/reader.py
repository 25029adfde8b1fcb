"""Read named TP=1 tensors from any rnope-train checkpoint, a layer at a time.

A checkpoint stores every weight under its global key (layers stacked on a leading axis),
whatever TP/PP/VPP it was saved with. A TP=PP=1 model built on the *meta* device gives,
for every state-dict name, the ShardedTensor that addresses it (key, layer offset, shape)
without allocating weights; loading a handful of names at a time through
dist-checkpointing reads only their bytes, so peak memory stays near one layer.
"""

from __future__ import annotations

import torch

from rnope_megatron.checkpoint.layout import FAILURES, CheckpointError, common_state, resolve, saved_recipe, unreadable
from rnope_megatron.checkpoint.model_state import keep_what_the_checkpoint_holds, load_into
from rnope_megatron.checkpoint.quantizer_state import restore_quantizers
from rnope_megatron.model.build import build_single_rank_model
from rnope_megatron.model.config import RNoPEConfig


class CheckpointReader:
    """Loads named TP=1 tensors from a checkpoint, a layer at a time.

    The meta-device model maps each state-dict name to its checkpoint key; layer weights
    are stacked under one key with the layer on axis 0, so one layer is requested as the
    [i:i+1] slice of that global tensor (the layout is the same whatever TP/PP saved it)."""

    def __init__(self, path, cfg: RNoPEConfig):
        from megatron.core import dist_checkpointing

        self.path = resolve(path)
        view = build_single_rank_model(cfg, meta=True).sharded_state_dict()
        self.keys = {name: item.key for name, item in view.items() if not name.endswith("_extra_state")}
        try:
            self.meta = dist_checkpointing.load_tensors_metadata(str(self.path))
        except FAILURES as err:
            raise unreadable(self.path, err) from None

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
                raise CheckpointError(f"checkpoint {self.path} has no tensor {key} (truncated or another model?)")
            info = self.meta[key]
            shape, dtype = tuple(info.global_shape), info.dtype
            if name.startswith("decoder.layers."):
                layer = int(name.split(".")[2])
                request[name] = ShardedTensor.from_rank_offsets(
                    key, torch.empty((1,) + shape[1:], dtype=dtype), (0, layer, shape[0]), replica_id=0)
            else:
                request[name] = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=dtype), replica_id=0)
        # A subset (one layer of a stacked key) on purpose: skip the whole-tensor coverage check.
        try:
            loaded = dist_checkpointing.load(request, str(self.path), validate_access_integrity=False)
        except FAILURES as err:
            raise unreadable(self.path, err) from None
        return {name: loaded[name][0] if name.startswith("decoder.layers.") else loaded[name] for name in names}


def load_model(path, cfg: RNoPEConfig | None = None):
    """The checkpoint's whole model on this (single) rank, in eval mode: ``(cfg, model)``.
    ``cfg`` defaults to the model section saved with the checkpoint. A checkpoint with
    quantizers (rnope-quantize, QAT) loads with them (needs the ``quant`` extra)."""
    from megatron.core import dist_checkpointing

    path = resolve(path)
    cfg = cfg or RNoPEConfig.from_dict(saved_recipe(path)["model"])
    model = build_single_rank_model(cfg)
    restore_quantizers([model], common_state(path), path)  # a quantized checkpoint evaluates quantized
    (request,) = keep_what_the_checkpoint_holds([model.sharded_state_dict()], path)
    try:
        loaded = dist_checkpointing.load({"model": request}, str(path))
    except FAILURES as err:
        raise unreadable(path, err) from None
    load_into(model, loaded["model"])
    return cfg, model.eval()
