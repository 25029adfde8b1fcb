"""Megatron's TE attention kept in bf16 on one layer while the FP8 recipe asks for FP8
attention (``fp8_dot_product_attention``, one global flag in Megatron).

Transformer Engine's ``DotProductAttention`` decides per call: it runs FP8 only inside an
enabled TE autocast whose recipe has ``fp8_dpa`` (``init_fp8_metadata`` reads the innermost
autocast). These classes call Megatron's own ``TEDotProductAttention`` (or our halo
variant under context parallelism) inside a nested autocast with FP8 *disabled*, with the
enclosing recipe and amax group (no new recipe is registered, no amax buffer changes).
Nesting autocasts to give layers different recipes is TE's documented pattern
(``dot_product_attention.py``). The surrounding linears keep their FP8 autocast.

Used on sliding-window layers on Hopper, where no TE backend runs FP8 attention with a
window, while the global layers run FP8 attention (``train.fp8.attention: global_only`` or
``auto``; see :mod:`rnope_megatron.model.precision`). They subclass Megatron's class, so
parameters and ``_extra_state`` keep their checkpoint keys. Without TE installed they are
placeholders that can sit in a spec and refuse to be built. Not run on this project's CPU
machines: see docs/verified.md.
"""

from __future__ import annotations

from megatron.core.extensions import transformer_engine as te_ext

from rnope_megatron.attention.te_halo import HaloTEDotProductAttention, _NeedsTransformerEngine, _te_available


def bf16_autocast():
    """A TE autocast with FP8 off, inheriting the enclosing recipe and amax group."""
    import transformer_engine.pytorch as te
    from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

    recipe, group = FP8GlobalStateManager.get_fp8_recipe(), FP8GlobalStateManager.get_fp8_group()
    if hasattr(te, "autocast"):  # TE >= 2.8 renamed fp8_autocast (which now warns)
        return te.autocast(enabled=False, recipe=recipe, amax_reduction_group=group)
    return te.fp8_autocast(enabled=False, fp8_recipe=recipe, fp8_group=group)


class _BF16Attention:
    """Mixin: the wrapped attention's forward runs with FP8 disabled."""

    def forward(self, *args, **kwargs):
        with bf16_autocast():
            return super().forward(*args, **kwargs)


class BF16AttentionTEDotProductAttention(
        _BF16Attention, te_ext.TEDotProductAttention if _te_available() else _NeedsTransformerEngine):
    """``TEDotProductAttention`` whose attention stays bf16 under an FP8-attention recipe."""


class BF16AttentionHaloTEDotProductAttention(_BF16Attention, HaloTEDotProductAttention):
    """:class:`HaloTEDotProductAttention` (sliding layer, halo CP) with bf16 attention."""
