"""Model construction, in one place.

Megatron 0.19 deprecates ``GPTModel`` in favour of ``HybridModel``, whose layer symbols
cannot yet say "sliding" vs "global" and which counts attention and MLP as separate
layers. Everything that builds a model goes through :func:`build_model`, so moving to
HybridModel later is a change to this module only."""

from __future__ import annotations

import logging

import torch

from rnope_megatron.model.config import RNoPEConfig
from rnope_megatron.model.norms import is_norm_bias
from rnope_megatron.model.specs import block_spec


def _scale_logits_hook(scale: float):
    # logits = W·(s·h) = s·(W·h): scaling the final norm's output scales the logits and
    # keeps GPTModel, its output layer and its state dict untouched.
    def hook(_module, _inputs, output):
        return output * scale

    return hook


def build_model(
    model: RNoPEConfig,
    config,
    backend: str = "portable",
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    pg_collection=None,
    bf16_attention_layers: frozenset[int] = frozenset(),
):
    """Build this rank's Megatron model chunk for ``model`` (see RNoPEConfig).

    Args:
        config: TransformerConfig from ``model.to_transformer_config(...)``.
        backend: ``portable`` or ``te`` (see :mod:`rnope_megatron.model.specs`).
        pre_process / post_process: whether this chunk holds the embedding / the output
            layer (first / last pipeline stage).
        vp_stage: virtual pipeline stage of this chunk (interleaved schedule).
        bf16_attention_layers: layers (global 1-based) that keep bf16 attention while the
            FP8 recipe runs FP8 attention elsewhere (``PrecisionPlan.bf16_attention_layers``).
    """
    from megatron.core.models.gpt import GPTModel

    # GPTModel logs a deprecation warning per construction; one notice in our docs suffices.
    gpt_logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    previous = gpt_logger.level
    gpt_logger.setLevel(logging.ERROR)
    try:
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(model, config, backend, vp_stage=vp_stage,
                                              bf16_attention_layers=bf16_attention_layers),
            vocab_size=model.vocab_size,
            max_sequence_length=model.max_seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=model.tie_embeddings,
            # No model-global rotary: RoPE layers own theirs (rnope_megatron.attention).
            position_embedding_type="none",
            vp_stage=vp_stage,
            pg_collection=pg_collection,
        )
    finally:
        gpt_logger.setLevel(previous)
    if post_process and model.logit_scale != 1.0:
        gpt.decoder.final_layernorm.register_forward_hook(_scale_logits_hook(model.logit_scale))
    if backend == "te" and model.normalization == "LayerNorm":
        freeze_norm_biases(gpt)
    return gpt


def run_model(model, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """A GPTModel forward as training runs it: positions 0..L-1 and no attention mask (the
    causal mask and the window come from the specs). Logits, or the per-token loss when
    ``labels`` are given. The trainer, evaluation and quantization all call this one."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return model(tokens, positions, None, labels=labels)


def freeze_norm_biases(model) -> list[str]:
    """Zero and freeze every LayerNorm bias (TE's LayerNorm always has one; the model, like
    Cohere2 and the portable norm, has none): te and portable then compute the same
    function, nothing is trained that an export would drop, and checkpoints move between
    the backends. Returns the names frozen."""
    import torch

    frozen = []
    for name, param in model.named_parameters():
        if is_norm_bias(name):
            with torch.no_grad():
                param.zero_()
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def build_single_rank_model(model: RNoPEConfig, meta: bool = False):
    """The whole model on one rank (TP=PP=1, portable backend), e.g. for conversion and
    evaluation. ``meta``: on the meta device, without allocating weights (its
    ``sharded_state_dict`` still names every tensor's checkpoint key and shape)."""
    config = model.to_transformer_config(init_model_with_meta_device=meta, perform_initialization=not meta)
    return build_model(model, config)
