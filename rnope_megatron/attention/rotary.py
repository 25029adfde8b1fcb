"""Per-layer rotary embedding: each RoPE layer has one, NoPE layers have none.

Megatron's model-global ``RotaryEmbedding`` moves its frequencies to
``torch.cuda.current_device()`` and has one base for all layers. This one builds the same
``[s, 1, 1, dim]`` frequency tensor (Megatron's layout for rotate-half and interleaved, so
Megatron's own ``apply_rotary_pos_emb`` applies it, fused on GPU) on the activations'
device, with the layer kind's own base. Layers with the same base share one table
(:func:`frequency_table`): at 128k tokens a table is tens of MB, once per theta and device,
not once per layer.
"""

from __future__ import annotations

import torch
from torch import nn

# (head_dim, theta, interleaved, device) -> the longest table built so far
_TABLES: dict[tuple, torch.Tensor] = {}


def frequency_table(head_dim: int, theta: float, interleaved: bool, seq_len: int, device) -> torch.Tensor:
    """RoPE angles for positions 0..seq_len-1 as [seq_len, 1, 1, head_dim] (fp32), from a
    cache shared by every layer with this base (grown when a longer sequence comes)."""
    key = (head_dim, float(theta), interleaved, str(device))
    table = _TABLES.get(key)
    if table is None or table.shape[0] < seq_len:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        if interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).view(seq_len, -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        table = _TABLES[key] = emb[:, None, None, :]
    return table[:seq_len]


def zigzag_rows(table: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """This context-parallel rank's positions of a per-position tensor (chunks r and
    2·CP−1−r of 2·CP, Megatron's ``get_batch_on_this_cp_rank`` layout)."""
    chunks = table.view(2 * cp_size, -1, *table.shape[1:])
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]])


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

    def forward(self, seq_len: int, device: torch.device, cp_group=None) -> torch.Tensor:
        """Frequencies for positions ``0..seq_len-1`` of the full (all-CP-ranks) sequence,
        sliced to this context-parallel rank's chunks."""
        emb = frequency_table(self.head_dim, self.theta, self.interleaved, seq_len, device)
        if cp_group is not None and cp_group.size() > 1:
            emb = zigzag_rows(emb, cp_group.size(), cp_group.rank())
        return emb

    def extra_repr(self) -> str:
        return f"dim={self.head_dim}, theta={self.theta:g}, interleaved={self.interleaved}"
