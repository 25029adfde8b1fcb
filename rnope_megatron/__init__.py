"""RNoPE-SWA hybrid attention for Megatron-Core.

The public entry points. ``build_model`` is resolved on first use (PEP 562): importing
any submodule runs this file first, and an eager import here would pull Megatron into
every light command path (recipe checks, plotting). It is the package's one deferred
import of its own code."""

from rnope_megatron.common.collector import paused as _collector_paused

with _collector_paused():  # torch loads here (common/collector.py)
    from rnope_megatron.model.config import ParallelLayout, RNoPEConfig
    from rnope_megatron.model.pattern import LayerKind, LayerPattern

__all__ = ["RNoPEConfig", "ParallelLayout", "LayerPattern", "LayerKind", "build_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "build_model":
        from rnope_megatron.model.build import build_model

        return build_model
    raise AttributeError(f"module 'rnope_megatron' has no attribute {name!r}")
