"""Typed weight mappings between Megatron and Hugging Face names.

Each mapping owns both directions of one weight relation, as Megatron-Bridge's param
mappings do: a 1:1 copy, the grouped QKV projection, the gated MLP's fused ``[gate; up]``.
Names may hold ``{i}`` (the 0-based layer index); Megatron names are the unwrapped
model's ``state_dict`` keys at TP=PP=1.

Weight layouts (Megatron-Core): ``linear_qkv.weight`` is grouped per KV group as
[q of the group's heads, k, v]; a gated MLP's ``linear_fc1.weight`` is [gate; up].
If the model's RoPE layout differs from the target's, q and k rows are permuted per head
(:attr:`Shapes.rope_order`): q·k is unchanged, so is every logit.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The shape facts a mapping needs, and the q/k row order between the layouts."""

    heads: int
    groups: int
    head_dim: int
    rope_order: torch.Tensor | None = None
    """Row order within a head that turns our q/k rows into the target's (None: same)."""

    @classmethod
    def of(cls, cfg, model_interleaved: bool, target_interleaved: bool) -> "Shapes":
        order = None
        if model_interleaved != target_interleaved:
            order = half_to_interleaved(cfg.head_dim)
            if model_interleaved:  # ours interleaved -> target halves: the inverse order
                order = torch.argsort(order)
        return cls(cfg.num_attention_heads, cfg.query_groups, cfg.head_dim, order)


def half_to_interleaved(dim: int) -> torch.Tensor:
    """Row order that turns rotate-half q/k rows into interleaved ones: pair (i, i+d/2)
    becomes (2i, 2i+1). Applied to both q and k it leaves every q·k unchanged."""
    return torch.arange(dim).view(2, dim // 2).t().reshape(-1)


def _reorder_rows(x: torch.Tensor, dim: int, order) -> torch.Tensor:
    """Reorder the rows of each head of a [heads·dim, hidden] q or k weight."""
    if order is None:
        return x
    return x.view(-1, dim, x.shape[-1])[:, order].reshape(x.shape)


@dataclasses.dataclass(frozen=True)
class Mapping:
    """One Megatron tensor <-> one or more Hugging Face tensors."""

    megatron: str
    hf: tuple[str, ...]

    arity: ClassVar[int] = 1

    def __post_init__(self):
        if len(self.hf) != self.arity:
            raise ValueError(f"{type(self).__name__} maps {self.arity} Hugging Face tensor(s), got {self.hf}")

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.megatron

    def names(self, layer: int | None) -> tuple[str, tuple[str, ...]]:
        """(Megatron name, HF names) for one layer (None for a non-layer tensor)."""
        if not self.per_layer:
            return self.megatron, self.hf
        return self.megatron.format(i=layer), tuple(name.format(i=layer) for name in self.hf)

    def to_hf(self, tensor: torch.Tensor, shapes: Shapes) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def to_megatron(self, tensors: tuple[torch.Tensor, ...], shapes: Shapes) -> torch.Tensor:
        raise NotImplementedError


class Direct(Mapping):
    """The same tensor under two names."""

    def to_hf(self, tensor, shapes):
        return (tensor,)

    def to_megatron(self, tensors, shapes):
        return tensors[0]


class QKV(Mapping):
    """Megatron's grouped ``linear_qkv`` <-> separate q, k, v projections."""

    arity = 3

    def to_hf(self, tensor, shapes):
        heads, groups, dim = shapes.heads, shapes.groups, shapes.head_dim
        hidden = tensor.shape[-1]
        per_group = tensor.view(groups, heads // groups + 2, dim, hidden)
        q = per_group[:, : heads // groups].reshape(heads * dim, hidden)
        k = per_group[:, -2].reshape(groups * dim, hidden)
        v = per_group[:, -1].reshape(groups * dim, hidden)
        return _reorder_rows(q, dim, shapes.rope_order), _reorder_rows(k, dim, shapes.rope_order), v

    def to_megatron(self, tensors, shapes):
        heads, groups, dim = shapes.heads, shapes.groups, shapes.head_dim
        q, k, v = tensors
        hidden = q.shape[-1]
        if shapes.rope_order is not None:  # target layout -> ours: the inverse permutation
            inverse = torch.argsort(shapes.rope_order)
            q, k = _reorder_rows(q, dim, inverse), _reorder_rows(k, dim, inverse)
        q = q.reshape(groups, heads // groups, dim, hidden)
        k, v = k.reshape(groups, 1, dim, hidden), v.reshape(groups, 1, dim, hidden)
        return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


class GatedMLP(Mapping):
    """Megatron's fused ``linear_fc1`` = [gate; up] <-> gate and up projections."""

    arity = 2

    def to_hf(self, tensor, shapes):
        return tuple(tensor.chunk(2, dim=0))

    def to_megatron(self, tensors, shapes):
        return torch.cat(tensors, dim=0)


class HeadNorm(Mapping):
    """A per-head QK-norm weight ([head_dim], applied to every head's q or k). The norm
    acts on each element of a head alike, so it follows the q/k rows' RoPE reordering."""

    def to_hf(self, tensor, shapes):
        return (tensor if shapes.rope_order is None else tensor[shapes.rope_order],)

    def to_megatron(self, tensors, shapes):
        if shapes.rope_order is None:
            return tensors[0]
        return tensors[0][torch.argsort(shapes.rope_order)]
