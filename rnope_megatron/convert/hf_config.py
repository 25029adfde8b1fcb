"""Hugging Face config <-> RNoPEConfig for the native SmolLM3 and Cohere2 classes.

Layer letters: sliding + RoPE = S, full + NoPE = G, full + RoPE = R. Cohere2 applies RoPE
exactly on its sliding layers (so it expresses S and G only); SmolLM3 takes independent
``layer_types`` and ``no_rope_layers`` (1 = RoPE; the inverse of Megatron's no_rope_freq).
"""

from __future__ import annotations

from rnope_megatron.config import RNoPEConfig

ARCHS = ("smollm3", "cohere2")


def _theta(hf: dict) -> float:
    # transformers 5.x writes rope_parameters: {rope_theta, rope_type}; older: rope_theta
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ValueError("config has no rope_theta (neither top-level nor in rope_parameters)")
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"RoPE scaling {params.get('rope_type')!r} cannot be represented (no RoPE rescaling here)")
    return float(theta)


def arch_of(hf: dict) -> str:
    model_type = hf.get("model_type")
    if model_type not in ARCHS:
        raise ValueError(f"model_type {model_type!r} is not one of {ARCHS}")
    return model_type


def from_hf(hf: dict) -> RNoPEConfig:
    """RNoPEConfig for a SmolLM3 or Cohere2 ``config.json`` dict."""
    arch = arch_of(hf)
    layers = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if arch == "cohere2":
        if types is None:  # legacy sliding_window_pattern
            every = hf.get("sliding_window_pattern", 4)
            types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(layers)]
        rope = [t == "sliding_attention" for t in types]
    else:
        if types is None:
            types = ["full_attention"] * layers
        if not hf.get("use_sliding_window", False):
            types = ["full_attention"] * layers
        rope = [bool(r) for r in hf.get("no_rope_layers", [1] * layers)]
    letters = []
    for index, (kind, has_rope) in enumerate(zip(types, rope)):
        if kind == "sliding_attention":
            if not has_rope:
                raise ValueError(f"layer {index}: a sliding-window NoPE layer has no letter in the pattern")
            letters.append("S")
        else:
            letters.append("R" if has_rope else "G")
    pattern = "".join(letters)
    heads = hf["num_attention_heads"]
    window = hf.get("sliding_window") or 4096
    return RNoPEConfig(
        num_layers=layers,
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"],
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        max_seq_length=max(hf.get("max_position_embeddings", 8192), window + 1),
        pattern=pattern,
        window=window,
        rope_theta=_theta(hf),
        rotary_interleaved=arch == "cohere2",
        normalization="LayerNorm" if arch == "cohere2" else "RMSNorm",
        norm_eps=hf.get("layer_norm_eps" if arch == "cohere2" else "rms_norm_eps", 1e-5),
        block="parallel" if arch == "cohere2" else "sequential",
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        logit_scale=float(hf.get("logit_scale", 0.0625)) if arch == "cohere2" else 1.0,
    )


def to_hf(cfg: RNoPEConfig, arch: str) -> dict:
    """``config.json`` dict for the target class; refuses what it cannot represent."""
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {ARCHS}, got {arch!r}")
    pattern = cfg.layer_pattern
    if cfg.qk_norm_local or cfg.qk_norm_global:
        raise ValueError(f"{arch} has no QK-norm; this model uses it")
    thetas = {cfg.rope_theta_for(pattern.kind(n)) for n in range(1, cfg.num_layers + 1)} - {None}
    if len(thetas) > 1:
        raise ValueError(f"{arch} has one RoPE theta; this model uses {sorted(thetas)}")
    common = dict(
        num_hidden_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.query_groups,
        intermediate_size=cfg.ffn_size, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_seq_length, tie_word_embeddings=cfg.tie_embeddings,
        layer_types=pattern.hf_layer_types(), sliding_window=cfg.window,
        rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
        hidden_act="silu", attention_bias=False, attention_dropout=0.0,
    )
    if arch == "cohere2":
        if cfg.block != "parallel" or cfg.normalization != "LayerNorm":
            raise ValueError("cohere2 needs block=parallel and normalization=LayerNorm")
        if any(c not in "SG" for c in pattern.layers):
            raise ValueError("cohere2 applies RoPE exactly on sliding layers: the pattern may only use S and G")
        return dict(common, model_type="cohere2", architectures=["Cohere2ForCausalLM"],
                    layer_norm_eps=cfg.norm_eps, logit_scale=cfg.logit_scale, use_qk_norm=False)
    if cfg.block != "sequential" or cfg.normalization != "RMSNorm":
        raise ValueError("smollm3 needs block=sequential and normalization=RMSNorm")
    if cfg.logit_scale != 1.0:
        raise ValueError("smollm3 has no logit scale")
    return dict(common, model_type="smollm3", architectures=["SmolLM3ForCausalLM"], rms_norm_eps=cfg.norm_eps,
                use_sliding_window=pattern.has_sliding,
                no_rope_layers=[int(pattern.kind(n).rope) for n in range(1, cfg.num_layers + 1)],
                pad_token_id=min(cfg.vocab_size - 1, 0))
