"""RNoPEConfig validation and the TransformerConfig it produces."""

import pytest

from rnope_megatron.model.config import ParallelLayout, RNoPEConfig
from rnope_megatron.model.pattern import LayerKind


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_attention_heads=6, num_query_groups=4), "num_query_groups"),
        (dict(hidden_size=66, num_attention_heads=4), "hidden_size"),
        (dict(pattern="SSQG"), "model.pattern"),
        (dict(num_layers=6), "model.pattern"),
        (dict(window=0), "model.pattern/window"),
        (dict(normalization="BatchNorm"), "model.normalization"),
        (dict(block="diagonal"), "model.block"),
        (dict(vocab_size=0), "model.vocab_size"),
        (dict(kv_channels=15), "head dimension"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.").replace("/", "/")):
        RNoPEConfig(**overrides)


def test_transformer_config_carries_the_pattern():
    cfg = RNoPEConfig(num_layers=8, window=512, max_seq_length=2048, num_query_groups=2)
    tc = cfg.to_transformer_config(ParallelLayout(tensor=1))
    assert tc.window_size == (511, 0)
    assert tc.window_attn_skip_freq == [1, 1, 1, 0, 1, 1, 1, 0]
    assert tc.no_rope_freq == [0, 0, 0, 1, 0, 0, 0, 1]
    assert tc.num_query_groups == 2 and tc.gated_linear_unit and not tc.add_bias_linear
    assert tc.normalization == "RMSNorm" and tc.layernorm_epsilon == cfg.norm_eps


def test_all_global_config_has_no_window():
    tc = RNoPEConfig(pattern="R").to_transformer_config()
    assert tc.window_size is None and tc.window_attn_skip_freq is None


def test_overrides_win():
    tc = RNoPEConfig().to_transformer_config(recompute_granularity="selective")
    assert tc.recompute_granularity == "selective"


def test_rope_theta_per_kind():
    cfg = RNoPEConfig(pattern="SSSR", rope_theta=10_000, global_rope_theta=500_000)
    assert cfg.rope_theta_for(LayerKind.of("S")) == 10_000
    assert cfg.rope_theta_for(LayerKind.of("R")) == 500_000
    assert cfg.rope_theta_for(LayerKind.of("G")) is None
    assert RNoPEConfig(pattern="SSSR").rope_theta_for(LayerKind.of("R")) == 10_000


def test_bad_dtype():
    with pytest.raises(ValueError, match="params_dtype"):
        RNoPEConfig().to_transformer_config(params_dtype="fp8")


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"unknown key model\.hiden_size"):
        RNoPEConfig.from_dict({"hiden_size": 64})


def test_shipped_model_recipes_build():
    import pathlib

    paths = sorted((pathlib.Path(__file__).parent.parent / "recipes" / "models").glob("*.yaml"))
    assert paths, "recipes/models/*.yaml missing"
    for path in paths:
        cfg = RNoPEConfig.from_yaml(path)
        tc = cfg.to_transformer_config()
        assert tc.num_layers == cfg.num_layers, path.name
    paper = RNoPEConfig.from_yaml(paths[0].parent / "paper-8b.yaml")
    assert paper.layer_pattern.te_window_size() == (4095, 0)
    assert [n for n in range(1, 33) if not paper.layer_pattern.kind(n).rope] == list(range(4, 33, 4))
