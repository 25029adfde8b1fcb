"""The llama / qwen3 targets and retrofit on import, against transformers' own classes.

Oracles: transformers' LlamaForCausalLM / Qwen3ForCausalLM built here from configs (no
downloads) for the targets; for a retrofit, transformers' SmolLM3ForCausalLM holding the
Llama's very tensors (SmolLM3 is the Llama layout with per-layer windows and NoPE layers,
so it states independently what "these weights under SSSG" computes). Tolerances: fp32
logits 2e-5 absolute (logits are O(1)); weight round trips are bit-exact (torch.equal)."""

import dataclasses
import json
import os

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from rnope_megatron.convert.streaming import hf_to_megatron, megatron_to_hf  # noqa: E402
from rnope_megatron.convert.targets import adapter_named, adapter_of  # noqa: E402
from rnope_megatron.model.build import build_model  # noqa: E402
from rnope_megatron.model.config import RNoPEConfig  # noqa: E402
from tests.test_convert import SEQ, TOL, _ids, _randomize, ours_from_hf  # noqa: E402
from tests.trainer import ROOT, assert_one_line_error, console_script, losses  # noqa: E402


def llama(layers=4, heads=4, kv=2, vocab=128, tied=True, theta=10000.0, hidden=64, seed=0):
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128,
                         tie_word_embeddings=tied, rope_parameters={"rope_theta": theta, "rope_type": "default"},
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    return _randomize(LlamaForCausalLM(config), seed)


def qwen3(layers=4, heads=4, kv=2, vocab=128, tied=False, head_dim=24):
    config = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                         max_position_embeddings=128, tie_word_embeddings=tied, pad_token_id=0)
    config._attn_implementation = "eager"
    return _randomize(Qwen3ForCausalLM(config))


HF_MODELS = {
    "llama-gqa2-tied": lambda: llama(),
    "llama-mha-untied-theta5e5": lambda: llama(heads=4, kv=4, tied=False, theta=5e5),
    "llama-mqa-3layers": lambda: llama(layers=3, heads=8, kv=1),
    "qwen3-gqa-qknorm-headdim24-untied": lambda: qwen3(),
}


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_to_ours_logits_match_transformers(megatron_single, name):
    hf_model = HF_MODELS[name]()
    cfg, ours = ours_from_hf(hf_model)
    assert set(cfg.layer_pattern.layers) == {"R"}
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = ours(ids, torch.arange(SEQ).expand(2, -1), None)
    assert expected.abs().max() > 0.5  # logits carry signal
    torch.testing.assert_close(got, expected, **TOL)
    # HF -> ours -> HF, in memory, bit-exact
    adapter = adapter_of(hf_model.config.to_dict())
    original = hf_model.state_dict()
    back = megatron_to_hf(adapter, cfg, hf_to_megatron(adapter, cfg, original))
    assert set(back) == set(original) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    assert all(torch.equal(back[k], original[k]) for k in back)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("tied", [True, False])
def test_our_rope_model_exports_to_llama(megatron_single, interleaved, tied):
    """An all-RoPE (R) model of ours, in either RoPE layout, tied or not: transformers'
    LlamaForCausalLM built from the exported config gives our logits, and the weights come
    back bit-exact (ours -> HF -> ours)."""
    from rnope_megatron.model.layout_invariant_init import fill_from_global, seeded_full_tensor

    cfg = RNoPEConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                      vocab_size=128, max_seq_length=128, pattern="R", rope_theta=10000.0, global_rope_theta=2e4,
                      rotary_interleaved=interleaved, tie_embeddings=tied, norm_eps=1e-5)
    ours = build_model(cfg, cfg.to_transformer_config()).eval()
    fill_from_global(ours, seeded_full_tensor(seed=5, std=0.08))
    adapter = adapter_named("llama")
    hf_cfg = adapter.to_hf(cfg)
    assert hf_cfg["rope_parameters"] == {"rope_theta": 2e4, "rope_type": "default"}  # the R layers' base
    assert "layer_types" not in hf_cfg and "sliding_window" not in hf_cfg
    hf_model = LlamaForCausalLM(LlamaConfig(**hf_cfg)).eval()
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("_extra_state")}
    result = hf_model.load_state_dict(megatron_to_hf(adapter, cfg, state), strict=False)
    assert set(result.missing_keys) <= ({"lm_head.weight"} if tied else set()) and not result.unexpected_keys
    ids = _ids(cfg.vocab_size, seed=4)
    with torch.no_grad():
        expected = hf_model(ids).logits
        assert expected.abs().max() > 0.5
        torch.testing.assert_close(ours(ids, torch.arange(SEQ).expand(2, -1), None), expected, **TOL)
    back = hf_to_megatron(adapter, cfg, megatron_to_hf(adapter, cfg, state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in back)


def run_convert(*args):
    import subprocess

    return subprocess.run([console_script("rnope-convert"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_llama_round_trip_through_the_installed_cli(tmp_path):
    """HF -> ours -> HF with rnope-convert: every tensor bit-exact, the config transformers
    reads back is a Llama with the same shapes and base."""
    hf_model = llama(tied=False, theta=5e5)
    hf_model.save_pretrained(tmp_path / "hf")
    assert run_convert("from-hf", tmp_path / "hf", tmp_path / "mg").returncode == 0
    out = run_convert("to-hf", tmp_path / "mg", tmp_path / "hf2", "--arch", "llama", "--dtype", "fp32")
    assert out.returncode == 0, out.stderr[-3000:]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf2")
    assert type(exported).__name__ == "LlamaForCausalLM"
    assert exported.config.rope_parameters["rope_theta"] == 5e5 and exported.config.num_key_value_heads == 2
    original, back = hf_model.state_dict(), exported.state_dict()
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)


LLAMA_3_8B = {  # shapes of meta-llama/Meta-Llama-3.1-8B's config.json (transformers 4 layout)
    "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def test_real_llama_config_imports_and_refusals_name_the_field():
    plain = dict(LLAMA_3_8B, rope_scaling=None)
    cfg = adapter_of(plain).from_hf(plain)
    assert cfg.layer_pattern.layers == "R" * 32 and cfg.rope_theta == 5e5 and cfg.query_groups == 8
    assert not cfg.tie_embeddings and cfg.norm_eps == 1e-5 and not cfg.rotary_interleaved
    llama = adapter_named("llama")
    with pytest.raises(ValueError, match="field rope_scaling.rope_type is 'llama3'"):
        llama.from_hf(LLAMA_3_8B)
    new_style = dict(plain, rope_theta=None, rope_parameters=dict(LLAMA_3_8B["rope_scaling"], rope_theta=5e5))
    with pytest.raises(ValueError, match="field rope_parameters.rope_type is 'llama3'"):
        llama.from_hf(new_style)
    for field in ("attention_bias", "mlp_bias"):
        with pytest.raises(ValueError, match=f"field '{field}' is true"):
            llama.from_hf(dict(plain, **{field: True}))
    with pytest.raises(ValueError, match="field 'hidden_act' is 'gelu'"):
        llama.from_hf(dict(plain, hidden_act="gelu"))
    with pytest.raises(ValueError, match="qwen2 has biases on its q/k/v projections"):
        adapter_of(dict(plain, model_type="qwen2"))
    with pytest.raises(ValueError, match="pattern must be all R, this model's is 'SSSG'"):
        llama.to_hf(dataclasses.replace(cfg, pattern="SSSG"))
    with pytest.raises(ValueError, match="qwen3 has QK-norm on every layer"):
        adapter_named("qwen3").to_hf(cfg)


def test_cli_refuses_llama3_scaling_in_one_line(tmp_path):
    hf_model = llama()
    hf_model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["rope_parameters"] = dict(LLAMA_3_8B["rope_scaling"], rope_theta=1e4)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    proc = run_convert("from-hf", tmp_path / "hf", tmp_path / "out")
    assert_one_line_error(proc, "rnope-convert", "config.json", "rope_parameters.rope_type is 'llama3'")
    assert not (tmp_path / "out").exists()


# ---- retrofit on import ----

def smollm3_oracle(hf_model, pattern: str, window: int):
    """transformers' SmolLM3 with the Llama's tensors, laid out as ``pattern``."""
    c = hf_model.config
    layers = pattern * (c.num_hidden_layers // len(pattern))
    config = SmolLM3Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                           num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                           num_key_value_heads=c.num_key_value_heads, max_position_embeddings=128,
                           rope_parameters=dict(c.rope_parameters), rms_norm_eps=c.rms_norm_eps,
                           use_sliding_window="S" in layers, sliding_window=window,
                           layer_types=["sliding_attention" if x == "S" else "full_attention" for x in layers],
                           no_rope_layers=[int(x in "SR") for x in layers], tie_word_embeddings=c.tie_word_embeddings,
                           pad_token_id=0)
    config._attn_implementation = "eager"
    oracle = SmolLM3ForCausalLM(config).eval()
    oracle.load_state_dict(hf_model.state_dict())
    return oracle


@pytest.mark.parametrize("pattern, window", [("SSSG", 8), ("SG", 5)])
def test_retrofit_equals_the_weights_under_the_new_pattern(megatron_single, tmp_path, pattern, window):
    """rnope-convert from-hf --pattern/--window on a Llama: the checkpoint's logits equal
    transformers' SmolLM3 holding the same tensors under that pattern, and equal our model
    built under the pattern with the plain import's weights; each layer's change is printed."""
    from rnope_megatron.checkpoint.reader import load_model

    hf_model = llama(theta=5e5)
    hf_model.save_pretrained(tmp_path / "hf")
    proc = run_convert("from-hf", tmp_path / "hf", tmp_path / "sssg", "--pattern", pattern, "--window", window)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("layer")]
    layers = pattern * (4 // len(pattern))
    assert len(lines) == 4
    for line, letter in zip(lines, layers):
        assert f"R -> {letter}" in line
        assert (f"window of {window} keys" in line) == (letter == "S")
        assert ("RoPE removed (NoPE)" in line) == (letter == "G")
    saved = yaml.safe_load((tmp_path / "sssg" / "model.yaml").read_text())["model"]
    assert saved["pattern"] == pattern and saved["window"] == window and saved["rope_theta"] == 5e5
    cfg, retrofitted = load_model(tmp_path / "sssg")
    assert SEQ > window
    ids = _ids(cfg.vocab_size, seed=6)
    positions = torch.arange(SEQ).expand(2, -1)
    plain_cfg, _ = ours_from_hf(hf_model)
    rebuilt = build_model(cfg, cfg.to_transformer_config()).eval()
    rebuilt.load_state_dict(hf_to_megatron(adapter_named("llama"), plain_cfg, hf_model.state_dict()), strict=False)
    with torch.no_grad():
        got = retrofitted(ids, positions, None)
        torch.testing.assert_close(got, smollm3_oracle(hf_model, pattern, window)(ids).logits, **TOL)
        assert torch.equal(got, rebuilt(ids, positions, None))
        assert (got - hf_model(ids).logits).abs().max() > 1e-2  # the pattern did change the function


@pytest.mark.parametrize("args, fragment", [
    (("--pattern", "SSG", "--window", "8"), "does not tile num_layers=4"),
    (("--pattern", "SSSG", "--window", "0"), "--window must be a positive number of tokens, got 0"),
    (("--pattern", "SSSG", "--window", "-3"), "--window must be a positive number of tokens, got -3"),
    (("--pattern", "SSXG",), "unknown letter(s) ['X']"),
])
def test_installed_cli_refuses_bad_retrofits_leaving_nothing(tmp_path, args, fragment):
    hf_model = llama()
    hf_model.save_pretrained(tmp_path / "hf")
    before = sorted(os.listdir(tmp_path))
    proc = run_convert("from-hf", tmp_path / "hf", tmp_path / "out", *args)
    assert_one_line_error(proc, "rnope-convert", fragment)
    assert sorted(os.listdir(tmp_path)) == before  # no output, no partial directory


def test_retrofit_uptrains_with_the_installed_trainer(tmp_path, data_cache):
    """A Llama retrofitted into SSSG continues training with rnope-train from the converted
    checkpoint (checkpoint.load, fresh optimizer), and the loss falls over a few steps."""
    import subprocess

    hf_model = llama(vocab=512, hidden=64, seed=3)
    with torch.no_grad():  # start near a plain LM's scale so the first loss is sane
        for name, p in hf_model.named_parameters():
            if "norm" not in name:
                p.mul_(0.25)
    hf_model.save_pretrained(tmp_path / "hf")
    assert run_convert("from-hf", tmp_path / "hf", tmp_path / "mg", "--pattern", "SSSG", "--window", "16").returncode == 0
    model = yaml.safe_load((tmp_path / "mg" / "model.yaml").read_text())["model"]
    recipe = tmp_path / "uptrain.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(ROOT / "recipes" / "tiny-cpu.yaml"), "model": model,
        "train": {"iters": 8, "seq_length": 64, "micro_batch_size": 4, "global_batch_size": 8,
                  "layout_invariant_init": False},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-3, "weight_decay": 0.0},
        "scheduler": {"warmup_iters": 0, "decay_style": "constant"},
        "checkpoint": {"load": str(tmp_path / "mg"), "reset_optimizer": True, "interval": 100},
        "logging": {"tensorboard": False, "interval": 1, "run_dir": str(tmp_path / "run")},
        "data": {"cache_dir": data_cache},
    }))
    proc = subprocess.run([console_script("rnope-train"), str(recipe)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    curve = losses(tmp_path / "run")
    assert sorted(curve) == list(range(1, 9))
    assert f"initialised from {tmp_path / 'mg'}" in proc.stdout and "(weights only)" in proc.stdout
    assert sum(curve[i] for i in (7, 8)) / 2 < curve[1] - 0.3, curve
