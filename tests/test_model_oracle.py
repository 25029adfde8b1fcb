"""Our model against oracles nobody here wrote: Megatron-Core's own native-flag model
(``window_size`` + ``window_attn_skip_freq`` + ``no_rope_freq``, model-global rotary,
DotProductAttention with its dense sliding mask), and permutation properties of NoPE.

Tolerance: 2e-5 absolute on fp32 logits / loss / gradients (measured ~3e-7)."""

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import build_module

from rnope_megatron.model.build import build_model
from rnope_megatron.model.layout_invariant_init import fill_from_global, seeded_full_tensor
from rnope_megatron.model.specs import layer_spec
from tests.support import tiny_config

TOL = dict(atol=2e-5, rtol=0)


def native_megatron_model(cfg, tc):
    return GPTModel(
        config=tc,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization=cfg.normalization),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_seq_length,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.rope_theta,
    )


@pytest.mark.parametrize(
    "overrides",
    [
        dict(pattern="SSSG", window=8),
        dict(pattern="SSSG", window=8, rotary_interleaved=True, rope_theta=500.0),
        dict(pattern="SSSG", window=13, num_query_groups=1, tie_embeddings=False),
        dict(pattern="SSSR", window=8),  # RoPE on the global layer (ablation)
        dict(pattern="R"),  # classic all-global RoPE
        dict(pattern="G"),  # all-global NoPE
        dict(pattern="SGSS", window=5, num_layers=4),  # explicit per-layer string
    ],
)
def test_equals_megatron_native_flags(megatron_single, overrides):
    cfg = tiny_config(**overrides)
    tc = cfg.to_transformer_config()
    ours, native = build_model(cfg, tc), native_megatron_model(cfg, tc)
    full = seeded_full_tensor(seed=7)
    fill_from_global(ours, full)
    fill_from_global(native, full)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))  # 40 > window: windows and NoPE matter
    pos = torch.arange(40).expand(2, -1)
    logits_ours, logits_native = ours(ids, pos, None), native(ids, pos, None)
    torch.testing.assert_close(logits_ours, logits_native, **TOL)
    labels = torch.roll(ids, -1, 1)
    loss_ours = ours(ids, pos, None, labels=labels).mean()
    loss_native = native(ids, pos, None, labels=labels).mean()
    torch.testing.assert_close(loss_ours, loss_native, **TOL)
    loss_ours.backward()
    loss_native.backward()
    native_params = dict(native.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, native_params[name].grad, **TOL, msg=name)


def test_logit_scale_scales_logits(megatron_single):
    cfg = tiny_config()
    tc = cfg.to_transformer_config()
    plain = build_model(cfg, tc)
    scaled = build_model(tiny_config(logit_scale=0.25), tc)
    full = seeded_full_tensor(seed=3)
    fill_from_global(plain, full)
    fill_from_global(scaled, full)
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    pos = torch.arange(20)[None]
    torch.testing.assert_close(scaled(ids, pos, None), 0.25 * plain(ids, pos, None), **TOL)


def _single_layer(letter, window=32, **overrides):
    cfg = tiny_config(num_layers=1, pattern=letter, window=window, **overrides)
    tc = cfg.to_transformer_config()
    layer = build_module(layer_spec(cfg, cfg.layer_pattern.kind(1)), config=tc, layer_number=1)
    with torch.no_grad():  # weights large enough that attention is far from uniform
        for name, p in layer.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.1)
    return layer.eval()


def _last_position_output(layer, x):
    with torch.no_grad():
        out, _ = layer(x, attention_mask=None)
    return out[-1]


@pytest.mark.parametrize("letter, invariant", [("G", True), ("R", False), ("S", False)])
def test_permuting_earlier_tokens(megatron_single, letter, invariant):
    """NoPE global attention is a set function of the earlier tokens: the last position's
    output ignores their order. RoPE layers (global or within the window) do not."""
    layer = _single_layer(letter)
    x = torch.randn(16, 2, 64)  # [s, b, h], s < window: the window is not what matters
    perm = torch.cat([torch.randperm(15), torch.tensor([15])])
    same = torch.allclose(_last_position_output(layer, x), _last_position_output(layer, x[perm]), atol=1e-5)
    assert same is invariant
    # earlier positions do change under the permutation in every case
    assert not torch.allclose(layer(x, attention_mask=None)[0][:15], layer(x[perm], attention_mask=None)[0][:15])


def test_parallel_block_is_x_plus_attn_plus_mlp_of_one_norm(megatron_single):
    cfg = tiny_config(num_layers=1, pattern="S", window=8, block="parallel", normalization="LayerNorm", norm_eps=1e-5)
    tc = cfg.to_transformer_config()
    layer = build_module(layer_spec(cfg, cfg.layer_pattern.kind(1)), config=tc, layer_number=1).eval()
    names = [n for n, _ in layer.named_parameters()]
    assert sum("norm" in n for n in names) == 1, names  # ONE shared norm
    x = torch.randn(20, 2, 64)
    with torch.no_grad():
        out, _ = layer(x, attention_mask=None)
        normed = layer.input_layernorm(x)
        expected = x + layer.self_attention(normed, attention_mask=None)[0] + layer.mlp(normed)[0]
        # the norm is a bias-free LayerNorm computed in fp32 (Cohere2's)
        ref_norm = torch.nn.functional.layer_norm(x, (64,), layer.input_layernorm.weight, None, 1e-5)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(normed, ref_norm, **TOL)


@pytest.mark.parametrize("output_init_std, expected", [(None, 0.05 / (2 * 4) ** 0.5), (0.05, 0.05)])
def test_output_init_std_sets_the_residual_output_projections(megatron_single, output_init_std, expected):
    """model.output_init_std: None keeps Megatron's scaled init (std / sqrt(2 L)) on the
    attention output and MLP fc2; a value replaces it. Other matrices keep init_method_std."""
    cfg = tiny_config(init_method_std=0.05, output_init_std=output_init_std, hidden_size=128,
                      ffn_hidden_size=256)
    model = build_model(cfg, cfg.to_transformer_config())
    for name, param in model.named_parameters():
        if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            assert param.std().item() == pytest.approx(expected, rel=0.05), name
        elif name.endswith(("linear_qkv.weight", "linear_fc1.weight")):
            assert param.std().item() == pytest.approx(0.05, rel=0.05), name
