"""Llama (transformers' ``LlamaForCausalLM``) and Qwen3 (``Qwen3ForCausalLM``): the
all-RoPE bases most users hold.

Both are the Llama layout: sequential pre-norm block with RMSNorm (a second norm before
the MLP), rotate-half RoPE on every layer, SwiGLU MLP, GQA, tied or untied embeddings.
Llama has global attention everywhere, so it expresses only the ``R`` letter: our
all-RoPE models export to it, and an import is ``R`` until retrofitted
(``rnope-convert from-hf --pattern``). Qwen3 adds a per-head RMSNorm on q and k (our
QK-norm, on every layer) and optional sliding windows on RoPE layers (``S``).

Refused in one line naming the field: linear biases (``attention_bias``, ``mlp_bias``;
our layers have none), an activation other than SiLU, and RoPE scaling (``llama3``,
``yarn``, ``linear``: our RoPE has one base and no per-frequency rescaling, see
:meth:`~rnope_megatron.convert.adapter.HFConfig.rope_theta`).
"""

from __future__ import annotations

from rnope_megatron.convert.adapter import HFAdapter, HFConfig, letters, register
from rnope_megatron.convert.mappings import Direct, HeadNorm
from rnope_megatron.model.config import RNoPEConfig

IMPORT_WINDOW = 4096
"""Window recorded on import of a model without one (the paper's; unused until a
retrofit turns layers into ``S`` and ``--window`` overrides it)."""

PRE_MLP_NORM = Direct("decoder.layers.{i}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",))


def refuse_llama_fields(hf: HFConfig, model_type: str, bias_fields: tuple[str, ...]) -> None:
    """One line naming the first field the model cannot represent."""
    for field in bias_fields:
        if hf.get(field, bool, False):
            raise ValueError(f"{hf.source}: field {field!r} is true: {model_type} biases cannot be represented "
                             "(rnope_megatron layers have no linear biases)")
    act = hf.get("hidden_act", str, "silu")
    if act != "silu":
        raise ValueError(f"{hf.source}: field 'hidden_act' is {act!r}: only SiLU (SwiGLU) is represented")


def require_llama_block(cfg: RNoPEConfig, model_type: str) -> None:
    if cfg.block != "sequential" or cfg.normalization != "RMSNorm":
        raise ValueError(f"{model_type} needs block=sequential and normalization=RMSNorm")
    if cfg.logit_scale != 1.0:
        raise ValueError(f"{model_type} has no logit scale (model.logit_scale={cfg.logit_scale})")


def llama_layout(hf: HFConfig, pattern: str, window: int, **fields) -> RNoPEConfig:
    """RNoPEConfig of a Llama-layout config.json with the given pattern."""
    return RNoPEConfig(
        pattern=pattern, window=window,
        max_seq_length=max(hf.positive("max_position_embeddings", 8192), window + 1 if "S" in pattern else 1),
        rotary_interleaved=False, normalization="RMSNorm", block="sequential",
        norm_eps=hf.get("rms_norm_eps", float, 1e-6), **fields,
    )


@register
class Llama(HFAdapter):
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    rope_interleaved = False

    def config_from_hf(self, hf: HFConfig) -> RNoPEConfig:
        refuse_llama_fields(hf, "llama", ("attention_bias", "mlp_bias"))
        return llama_layout(hf, "R", IMPORT_WINDOW, **self.common_fields(hf))

    def config_to_hf(self, cfg: RNoPEConfig) -> dict:
        require_llama_block(cfg, "llama")
        if set(cfg.layer_pattern.layers) != {"R"}:
            raise ValueError(f"llama has global RoPE attention on every layer: the pattern must be all R, this "
                             f"model's is {cfg.pattern!r} (export it with --arch smollm3)")
        return dict(rms_norm_eps=cfg.norm_eps, mlp_bias=False, pretraining_tp=1)

    def to_hf(self, cfg: RNoPEConfig) -> dict:
        out = super().to_hf(cfg)
        del out["layer_types"], out["sliding_window"]  # Llama has neither; all layers are global
        return out

    def block_mappings(self):
        return [PRE_MLP_NORM]


@register
class Qwen3(HFAdapter):
    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"
    rope_interleaved = False
    qk_norm = True

    def config_from_hf(self, hf: HFConfig) -> RNoPEConfig:
        refuse_llama_fields(hf, "qwen3", ("attention_bias",))
        common = self.common_fields(hf)
        layers = common["num_layers"]
        types = ["full_attention"] * layers
        if hf.get("use_sliding_window", bool, False):
            types = hf.per_layer_list("layer_types", layers) or [
                "sliding_attention" if i >= hf.get("max_window_layers", int, 28) else "full_attention"
                for i in range(layers)]
        pattern = letters(types, [True] * layers)
        window = hf.positive("sliding_window", None) or IMPORT_WINDOW
        return llama_layout(hf, pattern, window, qk_norm_local=True, qk_norm_global=True, **common)

    def config_to_hf(self, cfg: RNoPEConfig) -> dict:
        require_llama_block(cfg, "qwen3")
        if not (cfg.qk_norm_local and cfg.qk_norm_global):
            raise ValueError("qwen3 has QK-norm on every layer: set model.qk_norm_local and model.qk_norm_global")
        if "G" in cfg.layer_pattern.layers:
            raise ValueError("qwen3 applies RoPE on every layer: the pattern may only use S and R")
        sliding = cfg.layer_pattern.has_sliding
        return dict(rms_norm_eps=cfg.norm_eps, use_sliding_window=sliding, max_window_layers=0,
                    sliding_window=cfg.window if sliding else None)

    def block_mappings(self):
        return [PRE_MLP_NORM,
                HeadNorm("decoder.layers.{i}.self_attention.q_layernorm.weight", ("model.layers.{i}.self_attn.q_norm.weight",)),
                HeadNorm("decoder.layers.{i}.self_attention.k_layernorm.weight", ("model.layers.{i}.self_attn.k_norm.weight",))]
