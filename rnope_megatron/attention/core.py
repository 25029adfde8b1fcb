"""Portable core attention: Megatron's core-attention slot, plain torch, any device.

The layer's window comes as a spec parameter from the pattern
(:func:`rnope_megatron.model.specs.layer_spec`), as the RoPE base does for the self-attention:
the layer kind travels one way, from the pattern to the module."""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from rnope_megatron.attention.context_parallel import context_parallel_attention, context_parallel_group
from rnope_megatron.attention.sliding_window import (
    causal_attention,
    document_attention,
    document_lengths,
    sliding_window_attention,
)

ZIGZAG_THD = "thd_sequence_zigzag"
"""``qkv_format`` our self-attention gives a THD pack under context parallelism on the
portable backend: the tokens stay in the sequence-level zig-zag layout [2c, b, h, d] (RoPE
already applied per document by :class:`~rnope_megatron.attention.self_attention.RNoPESelfAttention`),
so Megatron's THD paths, which assume a per-document split, leave them alone."""


class PortableDotProductAttention(MegatronModule):
    """softmax(QK^T·scale) V over causal or sliding-window spans, [s, b, h, d] in and
    [s, b, h·d] out, like Megatron's DotProductAttention. Sliding layers cost O(L·W).

    Args:
        window: the layer's sliding window in HF semantics (W keys including the current
            one), or None for a global causal layer.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout=None,
        softmax_scale=None,
        cp_comm_type=None,
        pg_collection=None,
        window: int | None = None,
    ):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError("the portable attention backend supports attention_dropout=0 only")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"portable attention is causal only, got {attn_mask_type}")
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.window = window
        # Context parallelism: sliding layers exchange halos, global layers all-gather K/V
        # (rnope_megatron.attention.context_parallel).
        self.cp_group = None
        if config.context_parallel_size > 1:
            self.cp_group = context_parallel_group(pg_collection)

    def forward(
        self, query, key, value, attention_mask=None, attn_mask_type=None,
        attention_bias=None, packed_seq_params=None, **_unused,
    ):
        if attention_bias is not None:
            raise NotImplementedError("portable attention: no attention_bias")
        if attention_mask is not None:
            # Causality (and the window) are built in; silently dropping a padding mask
            # would give wrong results, so refuse it.
            raise ValueError(
                "portable attention is causal by construction: pass attention_mask=None "
                "(padding masks are not supported)"
            )
        if packed_seq_params is not None:
            return self._packed_forward(query, key, value, packed_seq_params)
        seq, batch, heads, dim = query.shape
        if self.cp_group is not None:
            out = context_parallel_attention(query, key, value, self.window, self.softmax_scale, self.cp_group)
            return out.reshape(seq, batch, heads * dim)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
        if self.window is None:
            out = causal_attention(q, k, v, self.softmax_scale)
        else:
            out = sliding_window_attention(q, k, v, self.window, self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * dim)

    def _packed_forward(self, query, key, value, packed_seq_params):
        """Document-masked attention of one THD pack: [t, h, d] in (Megatron squeezes the
        dummy batch for ``qkv_format='thd'``), [t, h·d] out."""
        cu_seqlens = packed_cu_seqlens(packed_seq_params)
        if packed_seq_params.qkv_format == ZIGZAG_THD:
            if self.cp_group is None:
                raise ValueError(f"packed_seq_params.qkv_format {ZIGZAG_THD!r} is for context parallelism only")

            seq, batch, heads, dim = query.shape
            out = context_parallel_attention(query, key, value, self.window, self.softmax_scale, self.cp_group,
                                             documents=cu_seqlens)
            return out.reshape(seq, batch, heads * dim)
        if self.cp_group is not None:
            raise ValueError("packed_seq_params.qkv_format: under context parallelism the portable backend "
                             "takes packs through RNoPESelfAttention (sequence-level zig-zag)")
        if query.dim() == 4:  # [t, 1, h, d]: a caller that kept the dummy batch
            query, key, value = (x.squeeze(1) for x in (query, key, value))
        tokens, heads, dim = query.shape
        document_lengths(cu_seqlens, tokens)  # the boundaries tile the pack
        q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (query, key, value))  # [1, h, t, d]
        out = document_attention(q, k, v, cu_seqlens, self.window, self.softmax_scale)
        return out[0].permute(1, 0, 2).reshape(tokens, heads * dim)

    def extra_repr(self) -> str:
        span = f"sliding window {self.window}" if self.window else "global causal"
        cp = ""
        if self.cp_group is not None:
            cp = ", CP: halo exchange" if self.window else ", CP: all-gather of K/V"
        return f"layer {self.layer_number}: {span}{cp}"


def packed_cu_seqlens(packed_seq_params):
    """The document boundaries of Megatron ``PackedSeqParams`` the portable backend can run:
    THD format, the same boundaries for queries and keys, no padding between documents.
    Anything else is refused in one line naming the field."""
    fmt = packed_seq_params.qkv_format
    if fmt not in ("thd", ZIGZAG_THD):
        raise ValueError(f"packed_seq_params.qkv_format must be 'thd' for document masking, got {fmt!r}")
    q, kv = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
    if q is None:
        raise ValueError("packed_seq_params.cu_seqlens_q is required (document boundaries)")
    if kv is not None and not _same(q, kv):
        raise ValueError("packed_seq_params.cu_seqlens_kv must equal cu_seqlens_q (self-attention)")
    for name in ("cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        padded = getattr(packed_seq_params, name)
        if padded is not None and not _same(q, padded):
            raise ValueError(
                f"packed_seq_params.{name}: padding between documents is not supported by the "
                "portable backend (pack documents back to back)"
            )
    return q


def _same(a, b) -> bool:
    return torch.equal(torch.as_tensor(a).cpu().long(), torch.as_tensor(b).cpu().long())
