"""Attention pieces: portable kernels, core attention, per-layer RoPE self-attention."""

from rnope_megatron.attention.sliding_window import (  # noqa: F401
    causal_attention,
    sliding_window_attention,
    sliding_window_mask,
)

__all__ = ["causal_attention", "sliding_window_attention", "sliding_window_mask"]
