"""SmolLM3 (transformers' ``SmolLM3ForCausalLM``): Llama layout with NoPE layers.

Sequential pre-norm block with RMSNorm (a second norm before the MLP), rotate-half RoPE,
independent ``layer_types`` and ``no_rope_layers`` (1 = RoPE: the inverse of Megatron's
``no_rope_freq``), so it expresses every pattern letter. Quirk: ``use_sliding_window``
without explicit ``layer_types`` puts the window on the NoPE layers, the reverse of
RNoPE-SWA, so the export always writes explicit ``layer_types``.
"""

from __future__ import annotations

from rnope_megatron.convert.adapter import HFAdapter, HFConfig, letters, register
from rnope_megatron.convert.mappings import Direct
from rnope_megatron.model.config import RNoPEConfig


@register
class SmolLM3(HFAdapter):
    model_type = "smollm3"
    architecture = "SmolLM3ForCausalLM"
    rope_interleaved = False

    def config_from_hf(self, hf: HFConfig) -> RNoPEConfig:
        common = self.common_fields(hf)
        layers = common["num_layers"]
        types = hf.per_layer_list("layer_types", layers) or ["full_attention"] * layers
        if not hf.get("use_sliding_window", bool, False):
            types = ["full_attention"] * layers
        rope = [bool(r) for r in hf.per_layer_list("no_rope_layers", layers) or [1] * layers]
        window = hf.positive("sliding_window", None) or 4096
        return RNoPEConfig(
            **common, pattern=letters(types, rope), window=window,
            max_seq_length=max(hf.positive("max_position_embeddings", 8192), window + 1),
            rotary_interleaved=False, normalization="RMSNorm", block="sequential",
            norm_eps=hf.get("rms_norm_eps", float, 1e-6),
        )

    def config_to_hf(self, cfg: RNoPEConfig) -> dict:
        if cfg.block != "sequential" or cfg.normalization != "RMSNorm":
            raise ValueError("smollm3 needs block=sequential and normalization=RMSNorm")
        if cfg.logit_scale != 1.0:
            raise ValueError("smollm3 has no logit scale")
        pattern = cfg.layer_pattern
        return dict(rms_norm_eps=cfg.norm_eps, use_sliding_window=pattern.has_sliding,
                    no_rope_layers=[int(pattern.kind(n).rope) for n in range(1, cfg.num_layers + 1)],
                    pad_token_id=0)  # transformers refuses to build SmolLM3 without a pad id < vocab

    def block_mappings(self):
        # The sequential block's second norm (before the MLP).
        return [Direct("decoder.layers.{i}.pre_mlp_layernorm.weight",
                       ("model.layers.{i}.post_attention_layernorm.weight",))]
