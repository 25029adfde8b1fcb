"""FLOP model of RNoPE-SWA and its baselines (per token; training = 3 x forward).

The one FLOP model of the package: the trainer's logged TFLOP/s and MFU
(:mod:`rnope_megatron.train.metrics`) and ``rnope-plan`` both read it.

Per layer, forward:  linear  2·(h·(q + 2·kv) + q·h + 3·h·ffn)   (q = heads·head_dim,
kv = kv_heads·head_dim, SwiGLU MLP) and attention 4·q·span, with span = the average
number of keys a query visits: (L+1)/2 for global causal, (W·L − W(W−1)/2)/L for a
window W. Plus the LM head 2·h·V. Megatron-LM's own formula has no window term: it
counts every layer as global and overstates an SWA model's MFU.
"""

from __future__ import annotations

# Components of :func:`forward_flops_breakdown`, in the order a layer runs them.
COMPONENTS = ("qkv", "attention_sliding", "attention_global", "attention_out", "mlp", "lm_head")


def attention_span(seq_len: int, window: int | None, exact: bool = True) -> float:
    """Average keys visited per query. ``exact``: counted over causal positions;
    otherwise the usual approximation L/2 (global) and W (window)."""
    if not exact:
        return seq_len / 2 if window is None else min(window, seq_len)
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    return (window * seq_len - window * (window - 1) / 2) / seq_len


def forward_flops_breakdown(model, seq_len: int, exact: bool = True) -> dict[str, float]:
    """Forward FLOPs per token of an RNoPEConfig at ``seq_len``, by component
    (:data:`COMPONENTS`): the QKV and output projections, the MLP, the attention
    scores+values of sliding and of global layers (the window counted exactly), the LM head."""
    h, q = model.hidden_size, model.num_attention_heads * model.head_dim
    kv = model.query_groups * model.head_dim
    parts = dict.fromkeys(COMPONENTS, 0.0)
    pattern = model.layer_pattern
    for number in range(1, model.num_layers + 1):
        kind = pattern.kind(number)
        parts["qkv"] += 2 * h * (q + 2 * kv)
        parts["attention_out"] += 2 * q * h
        parts["mlp"] += 2 * 3 * h * model.ffn_size
        window = model.window if kind.sliding else None
        # QK^T and PV: 2 FLOPs per multiply-add, q channels per key, twice
        parts["attention_sliding" if kind.sliding else "attention_global"] += 4 * q * attention_span(
            seq_len, window, exact)
    parts["lm_head"] = 2 * h * model.vocab_size
    return parts


def forward_flops_per_token(model, seq_len: int, exact: bool = True) -> float:
    """Forward FLOPs per token for an RNoPEConfig at sequence length ``seq_len``."""
    return sum(forward_flops_breakdown(model, seq_len, exact).values())


def attention_flops_per_token(model, seq_len: int, exact: bool = True) -> float:
    """Training FLOPs per token of the attention scores and values alone (both kinds)."""
    parts = forward_flops_breakdown(model, seq_len, exact)
    return 3 * (parts["attention_sliding"] + parts["attention_global"])


def training_flops_per_token(model, seq_len: int, exact: bool = True) -> float:
    """Model FLOPs per trained token (forward + backward = 3 x forward); recomputation
    is not model work and is left out (it is hardware work: see rnope_megatron.plan)."""
    return 3 * forward_flops_per_token(model, seq_len, exact)


def pack_forward_breakdown(model, document_lengths, exact: bool = True) -> dict[str, float]:
    """Forward FLOPs of one packed sequence whose documents do not see each other
    (document masking), by component (:data:`COMPONENTS`): the linear parts per token of
    the whole pack, attention per document (each document a sequence of its own, so
    global layers cost sum(d_i^2) and sliding ones sum(d_i * min(d_i, W)), not L^2 / L*W).
    ``[L]`` is the unmasked sequence. Cheap enough to count every sample of every step
    (the trainer's TFLOP/s does): the per-document work is two spans, not a walk over the
    layers."""
    lengths = [int(length) for length in document_lengths]
    total = sum(lengths)
    parts = {k: v * total for k, v in forward_flops_breakdown(model, max(total, 1), exact).items()}
    sliding = sum(model.layer_pattern.kind(n).sliding for n in range(1, model.num_layers + 1))
    global_ = model.num_layers - sliding
    per_pair = 4 * model.num_attention_heads * model.head_dim  # QK^T and PV per (query, key)
    parts["attention_sliding"] = sum(length * per_pair * sliding * attention_span(length, model.window, exact)
                                     for length in lengths)
    parts["attention_global"] = sum(length * per_pair * global_ * attention_span(length, None, exact)
                                    for length in lengths)
    return parts


def pack_forward_flops(model, document_lengths, exact: bool = True) -> float:
    """Forward FLOPs of one document-masked pack (:func:`pack_forward_breakdown`)."""
    return sum(pack_forward_breakdown(model, document_lengths, exact).values())


def pack_training_flops(model, document_lengths, exact: bool = True) -> float:
    """Training FLOPs (forward + backward = 3 x forward) of one document-masked pack."""
    return 3 * pack_forward_flops(model, document_lengths, exact)
