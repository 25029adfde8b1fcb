"""Which of Megatron's CUDA fusions a run can use, asked of Megatron itself.

Megatron enables a fusion by a TransformerConfig flag and fails at construction (or
refuses the config) when the kernel behind it is missing, so each flag is turned on only
when the kernel is there:

* RoPE fusion: TE's fused rotary kernel; interleaved pairs (Cohere2's layout) need TE >= 2.3
  (TransformerConfig raises otherwise).
* Gradient-accumulation fusion: Apex's ``fused_weight_gradient_mlp_cuda``; GPTModel's
  output layer is Megatron's own ColumnParallelLinear, which raises at construction when
  the flag is on and Apex is not installed (``pip install .[te]`` gives TE, not Apex).
* SwiGLU and bias-dropout-add fusions: torch-compiled, always there on CUDA.
"""

from __future__ import annotations


def te_rope_fusion_available(interleaved: bool = False) -> bool:
    """Whether Megatron found TE's fused RoPE kernel (it has no other), for this layout."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.utils import is_te_min_version

    if rope_utils.fused_apply_rotary_pos_emb is None:
        return False
    return not interleaved or is_te_min_version("2.3.0")


def grad_accum_fusion_available() -> bool:
    """Whether Megatron found Apex's weight-gradient accumulation kernel."""
    from megatron.core.tensor_parallel import layers

    return bool(layers._grad_accum_fusion_available)


def fusion_overrides(fusions: bool, backend: str, rotary_interleaved: bool = False) -> dict:
    """TransformerConfig flags for the fusions this machine has (see module docstring)."""
    if not fusions:
        return {}
    return dict(apply_rope_fusion=te_rope_fusion_available(rotary_interleaved), bias_activation_fusion=True,
                bias_dropout_fusion=True,
                gradient_accumulation_fusion=backend == "te" and grad_accum_fusion_available())
