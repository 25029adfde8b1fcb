"""RNoPE-SWA hybrid attention for Megatron-Core.

The public entry points. Importing any submodule runs this file first, so on a machine
without CUDA, Megatron-Core is imported here the way
:mod:`rnope_megatron.compat.megatron_import` describes. ``build_model`` is resolved on
first use (PEP 562): it pulls in Megatron's model classes, which light paths (recipe
checks, plotting) do not need. It is the package's one deferred import of its own code."""

from rnope_megatron.common.collector import paused as _collector_paused

with _collector_paused():  # torch (and on a CPU, Megatron) load here (common/collector.py)
    from rnope_megatron.common.cli import known_warnings_quiet as _known_warnings_quiet
    from rnope_megatron.compat.megatron_import import import_megatron_on_cpu as _import_megatron_on_cpu

    # Without CUDA, Megatron first, before any module of ours imports it: its import-time
    # torch.compile set-up for CUDA fusions is deferred (compat/megatron_import.py), and the
    # notices it prints on such a machine are the ones every console script quiets.
    with _known_warnings_quiet():
        _import_megatron_on_cpu()
    from rnope_megatron.model.config import ParallelLayout, RNoPEConfig
    from rnope_megatron.model.pattern import LayerKind, LayerPattern

__all__ = ["RNoPEConfig", "ParallelLayout", "LayerPattern", "LayerKind", "build_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "build_model":
        from rnope_megatron.model.build import build_model

        return build_model
    raise AttributeError(f"module 'rnope_megatron' has no attribute {name!r}")
