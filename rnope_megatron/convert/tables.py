"""Hugging Face <-> Megatron weight mapping: one declarative table per target.

A table row maps Hugging Face names (``{i}`` = layer index) to the Megatron name of the
same weight and names the typed transform between them. Transforms are pure functions
``to_megatron(hf tensors) -> tensor`` / ``to_hf(tensor) -> hf tensors`` with no model-
specific branches; the few shape facts they need (heads, groups, head dim) come from the
``RNoPEConfig``. Megatron names are the unwrapped model's ``state_dict`` keys at TP=PP=1.

If the model's RoPE layout (``rotary_interleaved``) differs from the target's, q and k rows
are permuted per head (``rope_order``): q·k is unchanged, so is every logit.

Weight layouts (Megatron-Core): ``linear_qkv.weight`` is grouped per KV group as
[q of the group's heads, k, v]; a gated MLP's ``linear_fc1.weight`` is [gate; up].
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a conversion table."""

    hf: tuple[str, ...]
    """Hugging Face names (``{i}`` = 0-based layer index)."""
    megatron: str
    """Megatron state-dict name (``{i}`` = 0-based layer index)."""
    transform: str = "identity"
    """Key into TRANSFORMS."""


# RoPE layout of each target: interleaved pairs (0,1),(2,3).. or halves (i, i + d/2).
ROPE_INTERLEAVED = {"smollm3": False, "cohere2": True}


def half_to_interleaved(dim: int) -> torch.Tensor:
    """Row order that turns rotate-half q/k rows into interleaved ones: pair (i, i+d/2)
    becomes (2i, 2i+1). Applied to both q and k it leaves every q·k unchanged."""
    return torch.arange(dim).view(2, dim // 2).t().reshape(-1)


def _rope_rows(x, dim: int, order) -> torch.Tensor:
    """Reorder the rows of each head of a [heads·dim, hidden] q or k weight."""
    if order is None:
        return x
    return x.view(-1, dim, x.shape[-1])[:, order].reshape(x.shape)


def _qkv_to_megatron(cfg, q, k, v, order=None):
    heads, groups, dim = cfg.num_attention_heads, cfg.query_groups, cfg.head_dim
    hidden = q.shape[-1]
    if order is not None:  # HF layout -> ours: the inverse permutation
        inverse = torch.argsort(order)
        q, k = _rope_rows(q, dim, inverse), _rope_rows(k, dim, inverse)
    q = q.view(groups, heads // groups, dim, hidden)
    k, v = k.view(groups, 1, dim, hidden), v.view(groups, 1, dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def _qkv_to_hf(cfg, qkv, order=None):
    heads, groups, dim = cfg.num_attention_heads, cfg.query_groups, cfg.head_dim
    hidden = qkv.shape[-1]
    per_group = qkv.view(groups, heads // groups + 2, dim, hidden)
    q = per_group[:, : heads // groups].reshape(heads * dim, hidden)
    k = per_group[:, -2].reshape(groups * dim, hidden)
    v = per_group[:, -1].reshape(groups * dim, hidden)
    return _rope_rows(q, dim, order), _rope_rows(k, dim, order), v


TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "identity": (lambda cfg, x, order=None: x, lambda cfg, x, order=None: (x,)),
    "qkv": (_qkv_to_megatron, _qkv_to_hf),
    "gate_up": (lambda cfg, gate, up, order=None: torch.cat([gate, up], dim=0),
                lambda cfg, fc1, order=None: tuple(fc1.chunk(2, dim=0))),
}


def rope_order(arch: str, cfg):
    """The q/k row permutation between our RoPE layout and the target's, or None."""
    if cfg.rotary_interleaved == ROPE_INTERLEAVED[arch]:
        return None
    if cfg.rotary_interleaved:  # ours interleaved -> target halves: the inverse order
        return torch.argsort(half_to_interleaved(cfg.head_dim))
    return half_to_interleaved(cfg.head_dim)

_ATTENTION = [
    Rule(("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
          "model.layers.{i}.self_attn.v_proj.weight"), "decoder.layers.{i}.self_attention.linear_qkv.weight", "qkv"),
    Rule(("model.layers.{i}.self_attn.o_proj.weight",), "decoder.layers.{i}.self_attention.linear_proj.weight"),
    Rule(("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
         "decoder.layers.{i}.mlp.linear_fc1.weight", "gate_up"),
    Rule(("model.layers.{i}.mlp.down_proj.weight",), "decoder.layers.{i}.mlp.linear_fc2.weight"),
    Rule(("model.layers.{i}.input_layernorm.weight",), "decoder.layers.{i}.input_layernorm.weight"),
]
_ENDS = [
    Rule(("model.embed_tokens.weight",), "embedding.word_embeddings.weight"),
    Rule(("model.norm.weight",), "decoder.final_layernorm.weight"),
]
_UNTIED_HEAD = Rule(("lm_head.weight",), "output_layer.weight")

TABLES: dict[str, list[Rule]] = {
    # SmolLM3 (Llama layout): sequential block, a second norm before the MLP.
    "smollm3": _ENDS + _ATTENTION + [
        Rule(("model.layers.{i}.post_attention_layernorm.weight",), "decoder.layers.{i}.pre_mlp_layernorm.weight"),
    ],
    # Cohere2: parallel block with ONE input_layernorm shared by attention and MLP.
    "cohere2": _ENDS + _ATTENTION,
}


def rules(arch: str, tied: bool) -> list[Rule]:
    if arch not in TABLES:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(TABLES)}")
    return TABLES[arch] + ([] if tied else [_UNTIED_HEAD])


def expand(rule: Rule, num_layers: int):
    """(hf names, megatron name) for every layer a rule covers."""
    if "{i}" not in rule.megatron:
        yield rule.hf, rule.megatron
        return
    for i in range(num_layers):
        yield tuple(name.format(i=i) for name in rule.hf), rule.megatron.format(i=i)


def hf_to_megatron(arch: str, cfg, hf_state: dict) -> dict:
    """Megatron (TP=PP=1) state dict from Hugging Face tensors; refuses leftovers."""
    out, used = {}, set()
    order = rope_order(arch, cfg)
    for rule in rules(arch, cfg.tie_embeddings):
        to_megatron, _ = TRANSFORMS[rule.transform]
        for hf_names, name in expand(rule, cfg.num_layers):
            missing = [n for n in hf_names if n not in hf_state]
            if missing:
                raise ValueError(f"Hugging Face checkpoint lacks {missing[0]} (truncated or not {arch}?)")
            out[name] = to_megatron(cfg, *(hf_state[n] for n in hf_names), order=order)
            used.update(hf_names)
    extra = sorted(set(hf_state) - used - {"lm_head.weight"} if cfg.tie_embeddings else set(hf_state) - used)
    if extra:
        raise ValueError(f"cannot represent Hugging Face tensor {extra[0]} (e.g. a bias) in an rnope_megatron model")
    return out


def megatron_to_hf(arch: str, cfg, state: dict) -> dict:
    """Hugging Face tensors from a Megatron (TP=PP=1) state dict."""
    out = {}
    order = rope_order(arch, cfg)
    for rule in rules(arch, cfg.tie_embeddings):
        _, to_hf = TRANSFORMS[rule.transform]
        for hf_names, name in expand(rule, cfg.num_layers):
            if name not in state:
                raise ValueError(f"Megatron state lacks {name}")
            for hf_name, tensor in zip(hf_names, to_hf(cfg, state[name], order=order)):
                out[hf_name] = tensor.contiguous()
    return out
