"""The Transformer Engine path's audit fixes, checked on CPU (TE absent: Megatron's TE
classes are placeholders, so what runs here is the logic that decides what TE gets).

* te runs do not ask for Apex's gradient-accumulation fusion when Apex is missing
  (GPTModel's output layer, Megatron's own ColumnParallelLinear, raised at construction);
* interleaved RoPE is fused only with TE >= 2.3 (TransformerConfig raises below);
* LayerNorm biases (TE's LayerNorm always has one) are zeroed and frozen;
* checkpoints move between the backends although one has state the other lacks;
* one RoPE frequency table per base, shared by the layers;
* the optimizer's checkpoint path with TE's FusedAdam is Megatron's own.
"""

import io

import pytest
import torch

from rnope_megatron.attention.rotary import LayerRotaryEmbedding
from rnope_megatron.model.build import build_model, freeze_norm_biases
from rnope_megatron.model.fusions import fusion_overrides, te_rope_fusion_available
from tests.support import tiny_config


def test_te_without_apex_builds_its_output_layer(megatron_single, monkeypatch):
    from megatron.core.tensor_parallel import layers

    monkeypatch.setattr(layers, "_grad_accum_fusion_available", False)  # Apex missing
    cfg = tiny_config()
    flags = fusion_overrides(True, "te")
    assert flags["gradient_accumulation_fusion"] is False
    flags["apply_rope_fusion"] = False  # no TE kernel on this machine either way
    build_model(cfg, cfg.to_transformer_config(**flags))  # the old flag raised here:
    with pytest.raises(RuntimeError, match="fused_weight_gradient_mlp_cuda"):
        build_model(cfg, cfg.to_transformer_config(**dict(flags, gradient_accumulation_fusion=True)))
    monkeypatch.setattr(layers, "_grad_accum_fusion_available", True)  # Apex present
    assert fusion_overrides(True, "te")["gradient_accumulation_fusion"] is True
    assert fusion_overrides(True, "portable")["gradient_accumulation_fusion"] is False


def test_interleaved_rope_is_fused_only_from_te_2_3(monkeypatch):
    from megatron.core import utils
    from megatron.core.models.common.embeddings import rope_utils

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)  # TE's kernel found
    monkeypatch.setattr(utils, "is_te_min_version", lambda version, *a, **k: version <= "2.2.0")  # TE 2.2
    assert te_rope_fusion_available(interleaved=False)
    assert not te_rope_fusion_available(interleaved=True)
    assert fusion_overrides(True, "te", rotary_interleaved=True)["apply_rope_fusion"] is False
    monkeypatch.setattr(utils, "is_te_min_version", lambda version, *a, **k: True)  # TE 2.3+
    assert te_rope_fusion_available(interleaved=True)


def test_te_layernorm_biases_are_zero_and_frozen():
    """Names as Megatron's TE modules have them; a linear's bias is not a norm's."""
    model = torch.nn.Module()
    names = ["decoder.layers.0.self_attention.linear_qkv.layer_norm_bias",
             "decoder.layers.0.input_layernorm.bias", "decoder.final_layernorm.bias",
             "decoder.layers.0.self_attention.linear_proj.bias", "decoder.layers.0.input_layernorm.weight"]
    for name in names:
        model.register_parameter(name.replace(".", "_"), torch.nn.Parameter(torch.ones(3)))
    params = dict(model.named_parameters())
    renamed = {name.replace(".", "_"): name for name in names}
    model.named_parameters = lambda: ((renamed[k], v) for k, v in params.items())
    frozen = freeze_norm_biases(model)
    assert frozen == names[:3]
    for key, param in params.items():
        is_bias = renamed[key] in names[:3]
        assert param.requires_grad is not is_bias
        assert torch.equal(param.detach(), torch.zeros(3) if is_bias else torch.ones(3))


@pytest.fixture
def te_like_state(monkeypatch):
    """The portable model given what TE's modules have and the portable ones lack: an
    ``_extra_state`` on the core attention (TE's FP8 metadata) and a LayerNorm bias."""
    from rnope_megatron.attention.core import PortableDotProductAttention
    from rnope_megatron.model.norms import PortableNorm

    def add_te_state():
        monkeypatch.setattr(PortableDotProductAttention, "get_extra_state",
                            lambda self: io.BytesIO(b"fp8 metadata"), raising=False)
        monkeypatch.setattr(PortableDotProductAttention, "set_extra_state", lambda self, state: None, raising=False)
        original_init = PortableNorm.__init__

        def with_bias(self, config, hidden_size, eps=1e-5, **kwargs):
            original_init(self, config, hidden_size, eps, **kwargs)
            self.bias = torch.nn.Parameter(torch.full((hidden_size,), 7.0))

        monkeypatch.setattr(PortableNorm, "__init__", with_bias)

    return add_te_state


def test_checkpoints_move_between_backends(megatron_single, tmp_path, te_like_state, monkeypatch):
    """A portable checkpoint (what from-hf writes) loads into a model with TE's extra state
    and norm biases (before: missing keys), and the other way round; the weights arrive."""
    from rnope_megatron.checkpoint.reader import load_model
    from rnope_megatron.checkpoint.weights_only import write_weights_checkpoint
    from rnope_megatron.model.build import build_single_rank_model
    from rnope_megatron.model.layout_invariant_init import fill_from_global, seeded_full_tensor

    cfg = tiny_config(normalization="LayerNorm", block="parallel")
    portable = build_single_rank_model(cfg)
    fill_from_global(portable, seeded_full_tensor(seed=3))
    state = {k: v for k, v in portable.state_dict().items() if not k.endswith("_extra_state")}
    write_weights_checkpoint(cfg, state, tmp_path / "portable", {"model": {}})
    te_like_state()
    _, loaded = load_model(tmp_path / "portable", cfg)
    for name, tensor in loaded.state_dict().items():
        if name in state:
            assert torch.equal(tensor, state[name]), name
    assert any(name.endswith("input_layernorm.bias") for name in loaded.state_dict())
    assert any(name.endswith("core_attention._extra_state") for name in loaded.state_dict())
    # and back: the te-like model's checkpoint into a model without that state
    write_weights_checkpoint(cfg, dict(loaded.state_dict()), tmp_path / "te", {"model": {}})
    monkeypatch.undo()
    _, plain = load_model(tmp_path / "te", cfg)
    assert not any(name.endswith("layernorm.bias") for name in plain.state_dict())
    for name, tensor in plain.state_dict().items():
        if name in state:
            assert torch.equal(tensor, state[name]), name


def test_rope_layers_share_one_frequency_table():
    """At 128k a table is tens of MB: one per base, not one per layer (and no pinned host
    copy per layer per micro-batch)."""
    first, second = LayerRotaryEmbedding(64, 10000.0, False), LayerRotaryEmbedding(64, 10000.0, False)
    a, b = first(4096, "cpu"), second(2048, "cpu")
    assert a.data_ptr() == b.data_ptr()
    assert LayerRotaryEmbedding(64, 50000.0, False)(2048, "cpu").data_ptr() != a.data_ptr()


def test_fused_adam_takes_megatrons_own_checkpoint_path(monkeypatch):
    """With TE's (or Apex's) FusedAdam the torch-Adam checkpoint fixes stay out of the way
    and fully_reshardable is allowed; without them they apply and it is refused."""
    from megatron.core.optimizer import distrib_optimizer

    from rnope_megatron.checkpoint import training_state
    from rnope_megatron.train.engine import _check_optimizer_format

    class FakeDistributed(distrib_optimizer.DistributedOptimizer):
        def __init__(self):
            self.optimizer = torch.optim.Adam([torch.nn.Parameter(torch.ones(2))])

    optimizer = FakeDistributed()
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    assert not training_state.uses_torch_adam_fixes(optimizer)
    _check_optimizer_format(True, "fully_reshardable")  # no error
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", False)
    assert training_state.uses_torch_adam_fixes(optimizer)
    with pytest.raises(ValueError, match="fully_reshardable needs TE or Apex"):
        _check_optimizer_format(True, "fully_reshardable")
