"""The Hugging Face targets rnope-convert knows: each module in :data:`TARGETS` registers
one :class:`~rnope_megatron.convert.adapter.HFAdapter` when imported."""

from __future__ import annotations

import importlib

from rnope_megatron.convert.adapter import ADAPTERS, HFAdapter

TARGETS = ("smollm3", "cohere2", "llama")

MISSING_PIECES = {
    "qwen2": "qwen2 has biases on its q/k/v projections and rnope_megatron layers have no linear biases",
}
"""Common bases that cannot be represented, and the piece our model lacks."""


def _load() -> dict[str, HFAdapter]:
    for name in TARGETS:
        importlib.import_module(f"rnope_megatron.convert.{name}")
    return ADAPTERS


def adapter_named(name: str) -> HFAdapter:
    """The adapter for ``--arch NAME`` / a config's ``model_type``."""
    adapters = _load()
    if name in MISSING_PIECES:
        raise ValueError(f"model_type {name!r} cannot be represented: {MISSING_PIECES[name]}")
    if name not in adapters:
        raise ValueError(f"model_type {name!r} is not one of {tuple(adapters)}")
    return adapters[name]


def adapter_of(hf: dict) -> HFAdapter:
    """The adapter for a ``config.json`` dict."""
    return adapter_named(hf.get("model_type"))


def target_names() -> tuple[str, ...]:
    return tuple(_load())
