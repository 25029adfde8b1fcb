"""Global view of a (tensor/pipeline-)sharded model's weights.

Megatron's ``sharded_state_dict`` already names every local shard by its global key,
global shape and slice, independent of TP/PP/VPP (dist-checkpointing uses it to reshard).
Reusing it gives one way to fill any parallel layout from full tensors — the same on
TP=1 and TP=2, on stage 0 and stage 1 — without a hand-written sharding table."""

from __future__ import annotations

import hashlib
from typing import Callable, Iterator

import torch


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree


def local_shards(chunks) -> Iterator:
    """Every ``ShardedTensor`` held by this rank's model chunk(s) (factories expanded)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    chunks = chunks if isinstance(chunks, (list, tuple)) else [chunks]
    for chunk in chunks:
        for leaf in _leaves(chunk.sharded_state_dict()):
            if isinstance(leaf, ShardedTensorFactory):
                leaf = leaf.build()
            for shard in _leaves(leaf):
                if isinstance(shard, ShardedTensor):
                    yield shard


@torch.no_grad()
def fill_from_global(chunks, full_tensor: Callable[[str, tuple], torch.Tensor]) -> int:
    """Copy ``full_tensor(key, global_shape)[global_slice]`` into every local shard.
    Returns the number of shards filled.

    Each full tensor is made once, for all the shards of its key, and one key at a time:
    a layer-stacked key (``decoder.layers.mlp.linear_fc1.weight``, global shape
    [num_layers, ...]) has one shard per local layer, and making it per shard made the
    whole stack num_layers times."""
    shards_of_key: dict[tuple, list] = {}
    for shard in local_shards(chunks):
        shards_of_key.setdefault((shard.key, tuple(shard.global_shape)), []).append(shard)
    for (key, global_shape), shards in shards_of_key.items():
        full = full_tensor(key, global_shape)
        for shard in shards:
            shard.data.copy_(full[shard.global_slice()].reshape(shard.data.shape))
    return sum(map(len, shards_of_key.values()))


def seeded_full_tensor(seed: int, std: float = 0.02) -> Callable[[str, tuple], torch.Tensor]:
    """Deterministic full tensors keyed by name: same values whatever the parallel layout.
    Norm weights are drawn around 1, everything else around 0."""

    def make(key: str, shape: tuple) -> torch.Tensor:
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        values = torch.randn(shape, generator=generator, dtype=torch.float64)
        if "norm" in key:
            return 1.0 + 0.1 * values
        return std * values

    return make
