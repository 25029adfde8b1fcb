"""Loading model weights across the two attention backends.

A ``te`` model has state a ``portable`` one lacks: TE modules' ``_extra_state`` (FP8
metadata, e.g. the core attention's) and, with LayerNorm, norm biases (TE's LayerNorm
always has one; ours are kept at zero and frozen, see ``model.freeze_norm_biases``). A
checkpoint written by one backend therefore lacks keys the other asks for. Those — and
only those — are left out of the load request and keep their fresh values (empty extra
state, zero biases); any other missing weight is still an error.
"""

from __future__ import annotations

import pathlib

from rnope_megatron.model.norms import is_norm_bias


def one_backend_only(name: str) -> bool:
    """State that exists on one backend only (see module docstring)."""
    return name.endswith("_extra_state") or is_norm_bias(name)


def _checkpoint_key(item) -> str | None:
    """The name an item of a sharded state dict has in the checkpoint's metadata."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    if isinstance(item, ShardedObject):
        return item.unique_key
    if isinstance(item, ShardedTensor):
        return item.key
    return None


def keep_what_the_checkpoint_holds(requests: list[dict], path: pathlib.Path) -> list[dict]:
    """The model chunks' flat sharded state dicts without the one-backend-only entries the
    checkpoint at ``path`` does not hold (its metadata is read once for all chunks)."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    held = set(load_sharded_metadata(str(path)).keys())

    def missing(name, item) -> bool:
        key = _checkpoint_key(item)
        return one_backend_only(name) and key is not None and key not in held

    return [{name: item for name, item in request.items() if not missing(name, item)} for request in requests]


def load_into(module, loaded: dict) -> None:
    """``module.load_state_dict(loaded)``, tolerating only one-backend-only keys."""
    result = module.load_state_dict(loaded, strict=False)
    missing = [k for k in result.missing_keys if not one_backend_only(k)]
    unexpected = [k for k in result.unexpected_keys if not one_backend_only(k)]
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
