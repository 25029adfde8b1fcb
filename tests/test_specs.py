"""Spec structure for both backends (TE not installed: Megatron's TE classes are
placeholders, so specs are built and inspected, not run), and pipeline/VPP numbering."""

import pytest
from megatron.core.extensions import transformer_engine as te_ext
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.transformer.utils import is_layer_window_attention

from rnope_megatron.attention.core import PortableDotProductAttention
from rnope_megatron.attention.self_attention import RNoPESelfAttention
from rnope_megatron.model.config import ParallelLayout
from rnope_megatron.model.norms import PortableNorm
from rnope_megatron.model.parallel_block import ParallelAttentionMLPLayer
from rnope_megatron.model.specs import block_spec, layer_spec, stage_layer_numbers
from tests.support import tiny_config


def _attention(spec):
    return spec.submodules.self_attention


@pytest.mark.parametrize("pattern", ["SSSG", "SSSR", "R", "G"])
def test_te_spec_structure(pattern):
    cfg = tiny_config(num_layers=8, pattern=pattern, window=16, rope_theta=10_000, global_rope_theta=5e5)
    tc = cfg.to_transformer_config()
    for number in range(1, 9):
        kind = cfg.layer_pattern.kind(number)
        spec = layer_spec(cfg, kind, backend="te")
        attn = _attention(spec)
        assert spec.module is TransformerLayer
        assert attn.module is RNoPESelfAttention
        sub = attn.submodules
        assert sub.core_attention is te_ext.TEDotProductAttention
        assert sub.linear_qkv is te_ext.TELayerNormColumnParallelLinear  # input norm fused
        assert sub.linear_proj is te_ext.TERowParallelLinear
        assert spec.submodules.input_layernorm is IdentityOp
        assert spec.submodules.pre_mlp_layernorm is IdentityOp
        # which layers TE gives the window to, exactly as TEDotProductAttention decides
        windowed = is_layer_window_attention(tc.window_size, tc.window_attn_skip_freq, number)
        assert windowed == (pattern[(number - 1) % len(pattern)] == "S")
        if windowed:
            assert tc.window_size == (15, 0)  # HF window 16 == TE (15, 0)
        # which layers get RoPE, and with which base
        expected_theta = {"S": 10_000, "R": 5e5, "G": None}[kind.letter]
        assert attn.params["rope_theta"] == expected_theta
        assert tc.no_rope_freq[number - 1] == (expected_theta is None)


def test_te_parallel_block_keeps_one_separate_norm():
    cfg = tiny_config(block="parallel", normalization="LayerNorm")
    spec = layer_spec(cfg, cfg.layer_pattern.kind(1), backend="te")
    assert spec.module is ParallelAttentionMLPLayer
    assert spec.submodules.input_layernorm is te_ext.TENorm
    assert spec.submodules.pre_mlp_layernorm is IdentityOp
    assert _attention(spec).submodules.linear_qkv is te_ext.TEColumnParallelLinear  # no fused norm
    assert spec.submodules.mlp.keywords["submodules"].linear_fc1 is te_ext.TEColumnParallelLinear


def test_portable_spec_structure_and_checkpoint_keys():
    cfg = tiny_config(qk_norm_global=True)
    local = layer_spec(cfg, cfg.layer_pattern.kind(1))
    glob = layer_spec(cfg, cfg.layer_pattern.kind(4))
    # the window reaches our core attention as a spec parameter, from the pattern
    assert _attention(local).submodules.core_attention.module is PortableDotProductAttention
    assert _attention(local).submodules.core_attention.params == {"window": 8}
    assert _attention(glob).submodules.core_attention.params == {"window": None}
    assert _attention(local).submodules.linear_qkv is ColumnParallelLinear
    assert local.submodules.input_layernorm is PortableNorm
    # QK-norm per kind: only the global layer has it here
    assert _attention(local).submodules.q_layernorm is IdentityOp
    assert _attention(glob).submodules.q_layernorm is PortableNorm
    # separate norms are saved under TE's fused names: checkpoints move between backends
    assert local.submodules.sharded_state_dict_keys_map == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
    }


def test_unknown_backend():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="backend"):
        layer_spec(cfg, cfg.layer_pattern.kind(1), backend="flash")


def test_vpp_numbering_for_a_pattern_not_aligned_with_stages():
    """12 layers, PP=2, VPP=2: chunks of 3 layers, so the global layers (4, 8, 12) sit first,
    middle and last in their chunks. Numbers come from Megatron's own offset function."""
    cfg = tiny_config(num_layers=12, pattern="SSSG")
    tc = cfg.to_transformer_config(ParallelLayout(pipeline=2, virtual_pipeline=2))
    expected = {(0, 0): [1, 2, 3], (1, 0): [4, 5, 6], (0, 1): [7, 8, 9], (1, 1): [10, 11, 12]}
    for (pp_rank, vp_stage), numbers in expected.items():
        assert stage_layer_numbers(tc, vp_stage=vp_stage, pp_rank=pp_rank) == numbers
        spec = block_spec(cfg, tc, vp_stage=vp_stage, pp_rank=pp_rank)
        thetas = [_attention(s).params["rope_theta"] for s in spec.layer_specs]
        assert thetas == [None if n % 4 == 0 else cfg.rope_theta for n in numbers]


def test_te_context_parallel_gives_sliding_layers_the_halo_exchange():
    """CP on te: sliding layers (cp_comm_type 'halo', the default) get our halo exchange
    around TE's attention; global layers keep TE's own CP (p2p ring). Choosing TE's a2a
    for sliding layers puts TE's attention back."""
    from rnope_megatron.attention.te_halo import HaloTEDotProductAttention

    cfg = tiny_config(num_layers=8)
    tc = cfg.to_transformer_config(ParallelLayout(context=2), backend="te")
    assert tc.cp_comm_type == ["halo", "halo", "halo", "p2p"] * 2
    specs = block_spec(cfg, tc, backend="te", pp_rank=0).layer_specs
    for number, spec in enumerate(specs, start=1):
        core = _attention(spec).submodules.core_attention
        assert core is (te_ext.TEDotProductAttention if number % 4 == 0 else HaloTEDotProductAttention), number
    a2a = cfg.to_transformer_config(ParallelLayout(context=2, context_comm_sliding="a2a"), backend="te")
    assert a2a.cp_comm_type == ["a2a", "a2a", "a2a", "p2p"] * 2
    assert all(_attention(s).submodules.core_attention is te_ext.TEDotProductAttention
               for s in block_spec(cfg, a2a, backend="te", pp_rank=0).layer_specs)
    portable = cfg.to_transformer_config(ParallelLayout(context=2))
    assert portable.cp_comm_type == ["halo", "halo", "halo", "all_gather"] * 2


def test_halo_attention_without_transformer_engine_says_what_to_install():
    from rnope_megatron.attention.te_halo import HaloTEDotProductAttention, _te_available

    if _te_available():
        pytest.skip("Transformer Engine is installed")
    cfg = tiny_config()
    with pytest.raises(RuntimeError, match=r"needs Transformer Engine: pip install 'rnope-megatron\[te\]'"):
        HaloTEDotProductAttention(cfg.to_transformer_config(ParallelLayout(context=2), backend="te"), 1, None)
