"""The one conversion driver: a target's mapping table applied a layer at a time.

``convert`` reads the tensors of one group (the non-layer tensors, then each layer in
turn) through a ``read(names) -> {name: tensor}`` callable and yields the converted
group, so the CLI streams checkpoints of any size and the tests convert in-memory state
dicts through the very same code (:func:`megatron_to_hf`, :func:`hf_to_megatron`).
"""

from __future__ import annotations

from typing import Callable, Iterator, Literal

import torch

from rnope_megatron.convert.adapter import HFAdapter
from rnope_megatron.convert.mappings import Mapping
from rnope_megatron.model.config import RNoPEConfig

Reader = Callable[[list[str]], dict[str, torch.Tensor]]


def layer_groups(mappings: list[Mapping], num_layers: int) -> list[list[tuple[Mapping, str, tuple[str, ...]]]]:
    """(mapping, Megatron name, HF names) rows grouped by layer: non-layer tensors first."""
    groups: list[list] = [[(m, *m.names(None)) for m in mappings if not m.per_layer]]
    for layer in range(num_layers):
        groups.append([(m, *m.names(layer)) for m in mappings if m.per_layer])
    return [group for group in groups if group]


def convert(adapter: HFAdapter, cfg: RNoPEConfig, read: Reader,
            direction: Literal["to_hf", "to_megatron"]) -> Iterator[dict[str, torch.Tensor]]:
    """Converted tensors, one group (non-layer tensors, then each layer) at a time."""
    shapes = adapter.shapes(cfg)
    for group in layer_groups(adapter.mappings(cfg), cfg.num_layers):
        if direction == "to_hf":
            loaded = read([name for _, name, _ in group])
            out: dict = {}
            for mapping, name, hf_names in group:
                out.update(zip(hf_names, mapping.to_hf(loaded[name], shapes)))
        else:
            loaded = read([hf_name for _, _, hf_names in group for hf_name in hf_names])
            out = {name: mapping.to_megatron(tuple(loaded[n] for n in hf_names), shapes)
                   for mapping, name, hf_names in group}
        yield out


def _dict_reader(state: dict, what: str) -> Reader:
    def read(names):
        missing = [name for name in names if name not in state]
        if missing:
            raise ValueError(f"{what} lacks {missing[0]} (truncated or another model?)")
        return {name: state[name] for name in names}

    return read


def megatron_to_hf(adapter: HFAdapter, cfg: RNoPEConfig, state: dict) -> dict:
    """Hugging Face tensors from a Megatron (TP=PP=1) state dict."""
    out: dict = {}
    for group in convert(adapter, cfg, _dict_reader(state, "Megatron state"), "to_hf"):
        out.update((name, tensor.contiguous()) for name, tensor in group.items())
    return out


def unused_hf_tensors(adapter: HFAdapter, cfg: RNoPEConfig, hf_names) -> list[str]:
    """HF tensors the table does not take (e.g. biases): converting would drop them."""
    used = {n for group in layer_groups(adapter.mappings(cfg), cfg.num_layers) for _, _, names in group for n in names}
    if cfg.tie_embeddings:
        used.add("lm_head.weight")  # transformers may store the tied head too
    return sorted(set(hf_names) - used)


def refuse_unused_hf_tensors(adapter: HFAdapter, cfg: RNoPEConfig, hf_names) -> None:
    """Converting must not silently drop a tensor (a bias, a QK-norm weight, ...)."""
    extra = unused_hf_tensors(adapter, cfg, hf_names)
    if extra:
        raise ValueError(f"cannot represent Hugging Face tensor {extra[0]} (e.g. a bias) in an rnope_megatron model")


def hf_to_megatron(adapter: HFAdapter, cfg: RNoPEConfig, hf_state: dict) -> dict:
    """Megatron (TP=PP=1) state dict from Hugging Face tensors; refuses leftovers."""
    refuse_unused_hf_tensors(adapter, cfg, hf_state)
    out: dict = {}
    for group in convert(adapter, cfg, _dict_reader(hf_state, f"Hugging Face {adapter.model_type} checkpoint"),
                         "to_megatron"):
        out.update(group)
    return out
