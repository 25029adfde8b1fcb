"""Megatron SelfAttention that rotates q/k with its own per-layer RoPE (or not at all)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.transformer.attention import SelfAttention

from rnope_megatron.attention.context_parallel import ZigZag
from rnope_megatron.attention.core import ZIGZAG_THD, PortableDotProductAttention
from rnope_megatron.attention.rotary import LayerRotaryEmbedding
from rnope_megatron.attention.sliding_window import document_ids
from rnope_megatron.attention.te_documents import check_te_packed_attention


class RNoPESelfAttention(SelfAttention):
    """Megatron ``SelfAttention`` for one layer of the pattern.

    RoPE layers (``rope_theta`` set) build their frequencies here and hand them to
    Megatron's own rotary path (``apply_rotary_pos_emb``: rotate-half or interleaved per
    ``config.rotary_interleaved``, TE-fused when ``apply_rope_fusion``). NoPE layers pass
    none, so no position signal reaches them; the model has no global rotary at all.
    Positions are 0..L-1 of each sequence; with THD ``packed_seq_params`` (document
    masking) they restart at 0 at each document (:meth:`_packed_rotary`), applied by
    Megatron's THD rotary path (``cu_seqlens``).
    """

    def __init__(self, config, submodules, layer_number, rope_theta: Optional[float] = None, **kwargs):
        super().__init__(config, submodules, layer_number, **kwargs)
        self.rotary = (
            LayerRotaryEmbedding(config.kv_channels, rope_theta, config.rotary_interleaved)
            if rope_theta is not None
            else None
        )
        self._packed_checked = False  # te: whether THD documents were checked runnable

    def _packed_rotary(self, packed, device, zigzag_group=None):
        """RoPE frequencies for a THD pack whose positions restart at each document, in the
        form Megatron's THD rotary path reads them. Unfused: one row per token of the pack
        (the positions within its document), which Megatron takes as the pack's own
        positions and applies in one call (it cuts each document's context-parallel share
        itself). Fused (TE's THD kernel indexes by the position within each document): the
        table of the longest document's positions. ``zigzag_group`` (portable backend under
        CP): the rows of this rank's zig-zag chunks of the sequence, applied as plain
        [s, b] positions."""
        longest = longest_document(packed.cu_seqlens_q)
        table = self.rotary(longest, device)
        if self.config.apply_rope_fusion and zigzag_group is None:
            return table
        total = int(packed.cu_seqlens_q[-1])
        positions = document_positions(packed.cu_seqlens_q, total)
        if zigzag_group is not None:
            size = zigzag_group.size()
            positions = positions[ZigZag(size, zigzag_group.rank(), total // (2 * size)).local_positions()]
        return table[positions.to(device)]

    def forward(self, hidden_states, attention_mask, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, *args, **kwargs):
        if inference_context is not None:
            # Decoding would need per-step position offsets for the rotary frequencies.
            raise NotImplementedError(
                "KV-cache inference is not supported by rnope_megatron yet (decoding needs "
                "per-step rotary position offsets)"
            )
        packed = kwargs.get("packed_seq_params")
        zigzag = (packed is not None and packed.qkv_format == "thd" and self.config.context_parallel_size > 1
                  and isinstance(self.core_attention, PortableDotProductAttention))
        if zigzag:  # portable CP keeps the sequence-level zig-zag: Megatron's THD paths must not apply
            kwargs["packed_seq_params"] = dataclasses.replace(packed, qkv_format=ZIGZAG_THD)
        if packed is not None and not self._packed_checked:
            if not isinstance(self.core_attention, PortableDotProductAttention):  # te
                check_te_packed_attention(self.config, self.layer_number, self.core_attention)
            self._packed_checked = True
        if self.rotary is None:
            rotary_pos_emb = None
        else:
            # hidden_states is this rank's [s, b, h]: s / TP under sequence parallelism;
            # the rotary length is the whole sequence, which the CP slice then cuts.
            seq = hidden_states.shape[0]
            if self.config.sequence_parallel:
                seq *= self.config.tensor_model_parallel_size
            seq *= self.config.context_parallel_size
            cp_group = self.pg_collection.cp
            if packed is not None and packed.qkv_format == "thd":
                rotary_pos_emb = self._packed_rotary(packed, hidden_states.device, cp_group if zigzag else None)
            else:
                rotary_pos_emb = self.rotary(seq, hidden_states.device, cp_group)
        return super().forward(
            hidden_states, attention_mask, key_value_states, inference_context, rotary_pos_emb,
            *args, **kwargs,
        )


def longest_document(cu_seqlens) -> int:
    """The longest document's length from Megatron's ``cu_seqlens``."""
    bounds = torch.as_tensor(cu_seqlens)
    return int((bounds[1:] - bounds[:-1]).max())


def document_positions(cu_seqlens, total: int) -> torch.Tensor:
    """Position ids restarting at 0 at each document ([total], int64)."""
    starts = torch.as_tensor(cu_seqlens).long()[:-1].cpu()
    return torch.arange(total) - starts[document_ids(cu_seqlens, total).long()]
