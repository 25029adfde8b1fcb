"""FLOP model of RNoPE-SWA and its baselines (per token; training = 3 x forward).

Per layer, forward:  linear  2·(h·(q + 2·kv) + q·h + 3·h·ffn)   (q = heads·head_dim,
kv = kv_heads·head_dim, SwiGLU MLP) and attention 4·q·span, with span = the average
number of keys a query visits: (L+1)/2 for global causal, (W·L − W(W−1)/2)/L for a
window W. Plus the LM head 2·h·V. Used for TFLOP/s and MFU in the trainer's log.
"""

from __future__ import annotations


def attention_span(seq_len: int, window: int | None, exact: bool = True) -> float:
    """Average keys visited per query. ``exact``: counted over causal positions;
    otherwise the usual approximation L/2 (global) and W (window)."""
    if not exact:
        return seq_len / 2 if window is None else min(window, seq_len)
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    return (window * seq_len - window * (window - 1) / 2) / seq_len


def forward_flops_per_token(model, seq_len: int, exact: bool = True) -> float:
    """Forward FLOPs per token for an RNoPEConfig at sequence length ``seq_len``."""
    h, q = model.hidden_size, model.num_attention_heads * model.head_dim
    kv = model.query_groups * model.head_dim
    linear = 2 * (h * (q + 2 * kv) + q * h + 3 * h * model.ffn_size)
    pattern = model.layer_pattern
    total = 0.0
    for number in range(1, model.num_layers + 1):
        window = model.window if pattern.kind(number).sliding else None
        total += linear + 4 * q * attention_span(seq_len, window, exact)
    return total + 2 * h * model.vocab_size


def training_flops_per_token(model, seq_len: int, exact: bool = True) -> float:
    return 3 * forward_flops_per_token(model, seq_len, exact)
