"""Cohere2 (transformers' ``Cohere2ForCausalLM``: Command R7B, Command A).

Parallel block ``x + attn(LN(x)) + mlp(LN(x))`` with ONE bias-free LayerNorm, interleaved
RoPE applied exactly on the sliding layers (so it expresses S and G only), logits times
``logit_scale``. Older configs give ``sliding_window_pattern`` (every N-th layer global)
instead of ``layer_types``.
"""

from __future__ import annotations

from rnope_megatron.convert.adapter import HFAdapter, HFConfig, letters, register
from rnope_megatron.model.config import RNoPEConfig


@register
class Cohere2(HFAdapter):
    model_type = "cohere2"
    architecture = "Cohere2ForCausalLM"
    rope_interleaved = True

    def config_from_hf(self, hf: HFConfig) -> RNoPEConfig:
        common = self.common_fields(hf)
        layers = common["num_layers"]
        types = hf.per_layer_list("layer_types", layers)
        if types is None:  # legacy sliding_window_pattern
            every = hf.positive("sliding_window_pattern", 4)
            types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(layers)]
        window = hf.positive("sliding_window", None) or 4096
        return RNoPEConfig(
            **common, pattern=letters(types, [t == "sliding_attention" for t in types]), window=window,
            max_seq_length=max(hf.positive("max_position_embeddings", 8192), window + 1),
            rotary_interleaved=True, normalization="LayerNorm", block="parallel",
            norm_eps=hf.get("layer_norm_eps", float, 1e-5),
            # transformers' class default; real configs say 0.25 or 1.0 (always written on export)
            logit_scale=hf.get("logit_scale", float, 0.0625),
        )

    def config_to_hf(self, cfg: RNoPEConfig) -> dict:
        if cfg.block != "parallel" or cfg.normalization != "LayerNorm":
            raise ValueError("cohere2 needs block=parallel and normalization=LayerNorm")
        if any(c not in "SG" for c in cfg.layer_pattern.layers):
            raise ValueError("cohere2 applies RoPE exactly on sliding layers: the pattern may only use S and G")
        return dict(layer_norm_eps=cfg.norm_eps, logit_scale=cfg.logit_scale, use_qk_norm=False)

    def block_mappings(self):
        return []  # the one input_layernorm feeds attention and MLP alike
