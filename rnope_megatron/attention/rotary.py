"""Per-layer rotary embedding: each RoPE layer owns one, NoPE layers have none.

Megatron's model-global ``RotaryEmbedding`` moves its frequencies to
``torch.cuda.current_device()`` and has one base for all layers. This one builds the same
``[s, 1, 1, dim]`` frequency tensor (Megatron's layout for rotate-half and interleaved, so
Megatron's own ``apply_rotary_pos_emb`` applies it, fused on GPU) on the activations'
device, with the layer kind's own base."""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank
from torch import nn


class LayerRotaryEmbedding(nn.Module):
    """RoPE frequencies for one attention layer.

    Args:
        head_dim: rotary dimension (the whole head).
        theta: RoPE base.
        interleaved: pairs (0,1),(2,3).. (Cohere2) instead of halves (Llama, SmolLM3).
    """

    def __init__(self, head_dim: int, theta: float, interleaved: bool):
        super().__init__()
        self.head_dim, self.theta, self.interleaved = head_dim, theta, interleaved
        self._cache: dict = {}

    def forward(self, seq_len: int, device: torch.device, cp_group=None) -> torch.Tensor:
        """Frequencies for positions ``0..seq_len-1`` of the full (all-CP-ranks) sequence,
        sliced to this context-parallel rank's chunks."""
        key = (seq_len, str(device))
        if key not in self._cache:
            inv_freq = 1.0 / (
                self.theta
                ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim)
            )
            freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
            if self.interleaved:
                emb = torch.stack((freqs, freqs), dim=-1).view(seq_len, -1)
            else:
                emb = torch.cat((freqs, freqs), dim=-1)
            self._cache = {key: emb[:, None, None, :]}  # keep one length: lengths rarely vary
        emb = self._cache[key]
        if cp_group is not None and cp_group.size() > 1:
            emb = get_pos_emb_on_this_cp_rank(emb, 0, cp_group)
        return emb

    def extra_repr(self) -> str:
        return f"dim={self.head_dim}, theta={self.theta:g}, interleaved={self.interleaved}"
