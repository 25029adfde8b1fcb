"""Megatron ``ModuleSpec`` trees for RNoPE-SWA layers, for both attention backends.

``te``: Megatron's Transformer Engine wrappers. Core attention is
``TEDotProductAttention``, which passes ``config.window_size`` to TE on exactly the layers
where ``is_layer_window_attention(config.window_attn_skip_freq, layer_number)`` holds;
the sequential block fuses the input norm into ``linear_qkv`` and the pre-MLP norm into
``linear_fc1`` as Megatron's own GPT spec does. The parallel block keeps one separate
``TENorm`` feeding two plain column-parallel linears (one shared norm, not two copies).

``portable``: Megatron's local tensor-parallel linears, our device-agnostic norm and core
attention (the native banded O(L·W) kernel on CPU, FlexAttention on CUDA), which gets the
layer's window as a spec parameter.

Both: ``RNoPESelfAttention`` gets the layer's RoPE base as a spec parameter (None: NoPE).
Layer kinds thus reach every module from the pattern, one way.

Context parallelism: the portable core attention exchanges halos (S) or gathers K/V
(global) itself. On ``te``, sliding layers whose ``cp_comm_type`` is ``halo`` (the
default) get :class:`~rnope_megatron.attention.te_halo.HaloTEDotProductAttention` (our
halo exchange around TE's fused attention); every other layer keeps TE's own CP.

FP8 (``train.fp8``): the TransformerConfig carries Megatron's FP8 fields; layers whose
attention must stay bf16 while others run FP8 attention get the ``te_precision`` classes
(see :mod:`rnope_megatron.model.precision`).
"""

from __future__ import annotations

import functools

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from rnope_megatron.attention import te_precision
from rnope_megatron.attention.core import PortableDotProductAttention
from rnope_megatron.attention.self_attention import RNoPESelfAttention
from rnope_megatron.attention.te_halo import HaloTEDotProductAttention
from rnope_megatron.model.config import RNoPEConfig
from rnope_megatron.model.norms import PortableNorm
from rnope_megatron.model.parallel_block import ParallelAttentionMLPLayer
from rnope_megatron.model.pattern import LayerKind

BACKENDS = ("portable", "te")


@functools.cache
def _modules(backend: str) -> dict:
    """The module classes filling each slot, per backend (TE imported only when asked)."""
    if backend == "portable":
        return dict(
            norm=PortableNorm, column=ColumnParallelLinear, norm_column=None,
            row=RowParallelLinear, core_attention=PortableDotProductAttention,
        )
    if backend == "te":
        # Without TE installed Megatron defines these as placeholders: specs can be built
        # and inspected on CPU, not run.
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        return dict(
            norm=TENorm, column=TEColumnParallelLinear, norm_column=TELayerNormColumnParallelLinear,
            row=TERowParallelLinear, core_attention=TEDotProductAttention,
        )
    raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")


def layer_spec(model: RNoPEConfig, kind: LayerKind, backend: str = "portable", cp_halo: bool = False,
               bf16_attention: bool = False) -> ModuleSpec:
    """Spec of one transformer layer of the given kind (``cp_halo``: a sliding layer
    under context parallelism that exchanges halos; ``bf16_attention``: the layer keeps
    bf16 attention although the FP8 recipe asks for FP8 attention. Both change only the
    ``te`` spec)."""
    m = _modules(backend)
    parallel_block = model.block == "parallel"
    # TE fuses a norm into the following linear; only the sequential block may use it, as
    # the parallel block's single norm feeds two linears.
    fuse_norm = m["norm_column"] is not None and not parallel_block
    qk_norm = m["norm"] if model.qk_norm_for(kind) else IdentityOp
    core_attention = m["core_attention"]
    if backend == "portable":  # ours takes the window from the pattern; TE's reads config.window_size
        core_attention = ModuleSpec(module=core_attention, params={"window": model.layer_pattern.window_of(kind)})
    else:
        core_attention = _te_core_attention(cp_halo and kind.sliding, bf16_attention)
    attention = ModuleSpec(
        module=RNoPESelfAttention,
        params={"attn_mask_type": AttnMaskType.causal, "rope_theta": model.rope_theta_for(kind)},
        submodules=SelfAttentionSubmodules(
            linear_qkv=m["norm_column"] if fuse_norm else m["column"],
            core_attention=core_attention,
            linear_proj=m["row"],
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )
    mlp = functools.partial(
        MLP.as_mlp_submodule,
        submodules=MLPSubmodules(
            linear_fc1=m["norm_column"] if fuse_norm else m["column"], linear_fc2=m["row"]
        ),
    )
    return ModuleSpec(
        module=ParallelAttentionMLPLayer if parallel_block else TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if fuse_norm else m["norm"],
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp if (fuse_norm or parallel_block) else m["norm"],
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=_unfused_norm_keys(fuse_norm, parallel_block),
        ),
    )


def _te_core_attention(halo: bool, bf16_attention: bool):
    """The te core-attention class: Megatron's, or ours around it for a halo exchange
    (:mod:`~rnope_megatron.attention.te_halo`) and/or bf16 attention under an FP8-attention
    recipe (:mod:`~rnope_megatron.attention.te_precision`)."""
    if not (halo or bf16_attention):
        return _modules("te")["core_attention"]

    if not bf16_attention:
        return HaloTEDotProductAttention
    return te_precision.BF16AttentionHaloTEDotProductAttention if halo else te_precision.BF16AttentionTEDotProductAttention


def _unfused_norm_keys(fuse_norm: bool, parallel_block: bool) -> dict:
    """Checkpoint keys of the sequential block's separate norms, renamed to TE's fused-norm
    keys (as Megatron's local GPT spec does), so a checkpoint moves between the portable
    and te backends. The parallel block has a separate input norm on both backends."""
    if fuse_norm or parallel_block:
        return {}
    return {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
    }


def stage_layer_numbers(config, vp_stage: int | None = None, pp_rank: int | None = None) -> list[int]:
    """Global 1-based layer numbers built by this pipeline rank / virtual stage, computed
    with Megatron's own offset and layer-count functions (what TransformerLayer uses)."""
    offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
    count = get_num_layers_to_build(config, vp_stage, pp_rank)
    return list(range(offset + 1, offset + count + 1))


def block_spec(
    model: RNoPEConfig, config, backend: str = "portable", vp_stage: int | None = None,
    pp_rank: int | None = None, bf16_attention_layers: frozenset[int] = frozenset(),
) -> TransformerBlockSubmodules:
    """This pipeline stage's layer specs (and the final norm, which Megatron builds only on
    the last stage). ``config`` is the TransformerConfig from ``model``;
    ``bf16_attention_layers`` (global 1-based numbers) keep bf16 attention under an
    FP8-attention recipe (:meth:`rnope_megatron.model.precision.PrecisionPlan.bf16_attention_layers`)."""
    pattern = model.layer_pattern
    comm = config.cp_comm_type if config.context_parallel_size > 1 else None
    halo = [isinstance(comm, list) and comm[n - 1] == "halo" for n in range(1, model.num_layers + 1)]
    specs = [
        layer_spec(model, pattern.kind(number), backend, cp_halo=halo[number - 1],
                   bf16_attention=number in bf16_attention_layers)
        for number in stage_layer_numbers(config, vp_stage, pp_rank)
    ]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=_modules(backend)["norm"])
