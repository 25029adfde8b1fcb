"""The layer pattern: parsing, validation and the lists derived from it."""

import pytest

from rnope_megatron.model.pattern import LayerKind, LayerPattern, expand_pattern


def test_block_repeats_to_num_layers():
    assert expand_pattern("SSSG", 8) == "SSSGSSSG"
    assert expand_pattern("SSSGSSSR", 8) == "SSSGSSSR"  # a full explicit string


@pytest.mark.parametrize(
    "pattern, layers, message",
    [
        ("SSXG", 4, "unknown letter"),
        ("ssSG", 4, "unknown letter"),
        ("SSSG", 6, "does not tile num_layers=6"),
        ("", 4, "non-empty"),
        ("SSSG", 0, "num_layers must be >= 1"),
    ],
)
def test_bad_patterns_name_the_problem(pattern, layers, message):
    with pytest.raises(ValueError, match=message):
        expand_pattern(pattern, layers)


@pytest.mark.parametrize("window", [0, -3, 2.5])
def test_window_must_be_positive_integer(window):
    with pytest.raises(ValueError, match="window"):
        LayerPattern.build("SSSG", 4, window)


def test_window_not_needed_without_sliding_layers():
    assert LayerPattern.build("G", 4, 0).layers == "GGGG"


def test_window_covering_sequence_warns():
    with pytest.warns(UserWarning, match="see every token"):
        LayerPattern.build("SSSG", 4, 128, max_seq_length=128)


def test_megatron_lists_have_opposite_meanings_of_one():
    p = LayerPattern.build("SSSG", 8, 16)
    # 1 = uses the window (Megatron window_attn_skip_freq list)
    assert p.window_attn_skip_freq() == [1, 1, 1, 0, 1, 1, 1, 0]
    # 1 = skips RoPE (Megatron no_rope_freq list)
    assert p.no_rope_freq() == [0, 0, 0, 1, 0, 0, 0, 1]


def test_baselines():
    assert LayerPattern.build("R", 4, 8).no_rope_freq() == [0, 0, 0, 0]  # classic RoPE
    assert LayerPattern.build("G", 4, 8).no_rope_freq() == [1, 1, 1, 1]  # all NoPE
    ablation = LayerPattern.build("SSSR", 4, 8)  # RoPE on the global layer
    assert ablation.kind(4).rope and not ablation.kind(4).sliding


def test_global_layers_are_every_fourth_one_based():
    p = LayerPattern.build("SSSG", 12, 16)
    assert [n for n in range(1, 13) if not p.kind(n).sliding] == [4, 8, 12]
    with pytest.raises(IndexError):
        p.kind(13)


def test_window_conversion_hf_to_te_and_per_kind():
    p = LayerPattern.build("SSSG", 4, 4096)
    assert p.te_window_size() == (4095, 0)  # TE counts keys before the current one
    assert p.megatron_fields() == dict(window_size=(4095, 0), window_attn_skip_freq=[1, 1, 1, 0],
                                       no_rope_freq=[0, 0, 0, 1])
    assert LayerPattern.build("G", 4, 4096).te_window_size() is None
    # the portable modules get the HF window itself, per kind
    assert p.window_of(LayerKind.of("S")) == 4096 and p.window_of(LayerKind.of("G")) is None


def test_hf_layer_types():
    assert LayerPattern.build("SSSG", 4, 8).hf_layer_types() == [
        "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"
    ]
