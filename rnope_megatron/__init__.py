"""RNoPE-SWA hybrid attention for Megatron-Core.

Heavy imports (Megatron, torch kernels) happen in the submodules; the names below are
the public entry points."""

from rnope_megatron.config import ParallelLayout, RNoPEConfig
from rnope_megatron.pattern import LayerKind, LayerPattern

__all__ = ["RNoPEConfig", "ParallelLayout", "LayerPattern", "LayerKind", "build_model"]
__version__ = "0.1.0"


def build_model(*args, **kwargs):
    """See :func:`rnope_megatron.model.build_model` (imported lazily: it pulls in Megatron)."""
    from rnope_megatron.model import build_model as _build

    return _build(*args, **kwargs)
