"""Hugging Face conversion against transformers' own Cohere2 / SmolLM3 classes (the oracle).

Tiny random HF models are built here from configs (GQA ratios, windows that do not divide
the sequence, odd layer counts); sequences are longer than the window so the window and
NoPE paths matter. Tolerances: fp32 logits / losses 2e-5 absolute (logits are O(1)); weight
round trips and cross-layout exports are bit-exact (torch.equal)."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, Cohere2Config, Cohere2ForCausalLM, SmolLM3Config, SmolLM3ForCausalLM  # noqa: E402

from rnope_megatron.convert.streaming import hf_to_megatron, megatron_to_hf  # noqa: E402
from rnope_megatron.convert.targets import adapter_named, adapter_of  # noqa: E402
from rnope_megatron.model.build import build_model  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOL = dict(atol=2e-5, rtol=0)
SEQ = 40


def _randomize(model, seed=0):
    """Weights big enough for O(1) logits (HF's 0.02 init makes nearly flat ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.08 * noise)
    return model.eval()


def cohere2(layers=4, heads=4, kv=2, window=8, vocab=128, tied=True):
    config = Cohere2Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv, sliding_window=window,
                           max_position_embeddings=128, logit_scale=0.25, tie_word_embeddings=tied,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    return _randomize(Cohere2ForCausalLM(config))


def smollm3(layers=4, heads=4, kv=4, window=6, sliding=True, no_rope=None, vocab=128, tied=True):
    no_rope = no_rope or [int((i + 1) % 4 != 0) for i in range(layers)]
    types = ["sliding_attention" if (sliding and r) else "full_attention" for r in no_rope]
    config = SmolLM3Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv, sliding_window=window,
                           use_sliding_window=sliding, layer_types=types, no_rope_layers=no_rope,
                           max_position_embeddings=128, tie_word_embeddings=tied, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    return _randomize(SmolLM3ForCausalLM(config))


HF_MODELS = {
    "cohere2-gqa2": lambda: cohere2(),
    "cohere2-5layers-mqa-window7": lambda: cohere2(layers=5, kv=1, window=7),
    "cohere2-untied": lambda: cohere2(heads=8, kv=2, tied=False),
    "smollm3-swa-mha-window6": lambda: smollm3(),
    "smollm3-3b-style-no-window-3layers": lambda: smollm3(layers=3, heads=4, kv=2, sliding=False, no_rope=[1, 1, 0]),
}


def ours_from_hf(hf_model):
    adapter = adapter_of(hf_model.config.to_dict())
    cfg = adapter.from_hf(hf_model.config.to_dict())
    model = build_model(cfg, cfg.to_transformer_config()).eval()
    state = hf_to_megatron(adapter, cfg, hf_model.state_dict())
    result = model.load_state_dict(state, strict=False)
    assert [k for k in result.missing_keys if not k.endswith("_extra_state")] == [] and not result.unexpected_keys
    return cfg, model


def _ids(vocab, seed=1):
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_to_ours_logits_match_transformers(megatron_single, name):
    hf_model = HF_MODELS[name]()
    cfg, ours = ours_from_hf(hf_model)
    assert SEQ > cfg.window
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = ours(ids, torch.arange(SEQ).expand(2, -1), None)
    assert expected.abs().max() > 0.5  # logits carry signal
    torch.testing.assert_close(got, expected, **TOL)


def run_cli(*args, check=True):
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check and out.returncode:
        raise AssertionError(f"{args} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return out


@pytest.mark.parametrize("name", ["cohere2-5layers-mqa-window7", "smollm3-swa-mha-window6"])
def test_round_trip_export_eval_and_transformers_load(megatron_single, tmp_path, name):
    hf_model = HF_MODELS[name]()
    hf_model.save_pretrained(tmp_path / "hf")
    run_cli("-m", "rnope_megatron.convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "mg"))
    assert yaml.safe_load((tmp_path / "mg" / "model.yaml").read_text())["model"]["pattern"]
    run_cli("-m", "rnope_megatron.convert", "to-hf", str(tmp_path / "mg"), str(tmp_path / "hf2"), "--dtype", "fp32")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    original, back = hf_model.state_dict(), exported.state_dict()
    assert original.keys() == back.keys()
    for key in original:
        assert torch.equal(original[key], back[key]), key  # bit-exact round trip
    config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert config["layer_types"] == hf_model.config.layer_types
    # the exported model's logits equal our checkpoint's
    from rnope_megatron.checkpoint.reader import load_model

    _, ours = load_model(tmp_path / "mg")
    probe = _ids(hf_model.config.vocab_size, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(exported(probe).logits, ours(probe, torch.arange(SEQ).expand(2, -1), None), **TOL)
    # rnope-eval loss on the Megatron checkpoint == transformers' loss on the same ids
    ids = _ids(hf_model.config.vocab_size, seed=3)
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    out = run_cli("-m", "rnope_megatron.eval", "loss", "--checkpoint", str(tmp_path / "mg"),
                  "--input-ids", str(tmp_path / "ids.json"), "--json")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        hf_loss = exported(ids, labels=ids).loss.item()
    assert result["tokens"] == 2 * (SEQ - 1)
    assert result["loss"] == pytest.approx(hf_loss, abs=2e-5)


def test_checkpoints_saved_with_tp2_and_pp2_export_identically(tmp_path, data_cache):
    """Weights from from-hf pass through rnope-train under TP=2 and under PP=2 at lr=1e-30
    (lr=0 is refused as a recipe error; an Adam step of 1e-30 is below every weight's
    float32 resolution, so the weights do not move); each saved checkpoint exports
    bit-identically to the TP=PP=1 one."""
    hf_model = cohere2(vocab=512)
    hf_model.save_pretrained(tmp_path / "hf")
    run_cli("-m", "rnope_megatron.convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "mg"))
    model = yaml.safe_load((tmp_path / "mg" / "model.yaml").read_text())["model"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(ROOT / "recipes" / "tiny-cpu.yaml"), "model": model,
        "train": {"iters": 2, "stop_at": 1, "seq_length": 64, "micro_batch_size": 2, "global_batch_size": 4,
                  "layout_invariant_init": False},
        "optimizer": {"lr": 1e-30, "min_lr": 0.0, "weight_decay": 0.0},
        "scheduler": {"warmup_iters": 0, "decay_style": "constant"},
        "checkpoint": {"load": str(tmp_path / "mg"), "reset_optimizer": True},
        "logging": {"tensorboard": False},
    }))
    run_cli("-m", "rnope_megatron.convert", "to-hf", str(tmp_path / "mg"), str(tmp_path / "ref"), "--dtype", "fp32")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ref").state_dict()
    for layout in ("parallel.tensor=2", "parallel.pipeline=2"):
        run_dir = tmp_path / layout.split(".")[1].split("=")[0]
        run_cli("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "rnope_megatron.train",
                str(recipe), layout, f"logging.run_dir={run_dir}", f"data.cache_dir={data_cache}")
        run_cli("-m", "rnope_megatron.convert", "to-hf", str(run_dir / "checkpoints"), str(run_dir / "hf"),
                "--dtype", "fp32", "--arch", "cohere2")
        exported = AutoModelForCausalLM.from_pretrained(run_dir / "hf").state_dict()
        for key in reference:
            assert torch.equal(exported[key], reference[key]), (layout, key)


COMMAND_R7B = {  # shapes of CohereForAI/c4ai-command-r7b-12-2024's config.json
    "model_type": "cohere2", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 256000, "sliding_window": 4096,
    "sliding_window_pattern": 4, "rope_theta": 50000.0, "logit_scale": 0.25, "layer_norm_eps": 1e-5,
    "max_position_embeddings": 132096, "tie_word_embeddings": True,
}
SMOLLM3_3B = {  # shapes of HuggingFaceTB/SmolLM3-3B's config.json (transformers 5 layout)
    "model_type": "smollm3", "num_hidden_layers": 36, "hidden_size": 2048, "num_attention_heads": 16,
    "num_key_value_heads": 4, "intermediate_size": 11008, "vocab_size": 128256, "rms_norm_eps": 1e-6,
    "rope_theta": None, "rope_parameters": {"rope_theta": 5000000.0, "rope_type": "default"},
    "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(36)], "use_sliding_window": False,
    "sliding_window": None, "max_position_embeddings": 65536, "tie_word_embeddings": True,
}


def test_real_configs_import():
    r7b = adapter_of(COMMAND_R7B).from_hf(COMMAND_R7B)
    assert r7b.layer_pattern.layers == "SSSG" * 8 and r7b.window == 4096 and r7b.rope_theta == 50000.0
    assert r7b.block == "parallel" and r7b.normalization == "LayerNorm" and r7b.rotary_interleaved
    assert r7b.logit_scale == 0.25 and r7b.query_groups == 8 and r7b.ffn_size == 14336
    smol = adapter_of(SMOLLM3_3B).from_hf(SMOLLM3_3B)
    assert smol.layer_pattern.layers == "RRRG" * 9  # NoPE every 4th layer, no sliding window
    assert smol.rope_theta == 5e6 and smol.block == "sequential" and not smol.rotary_interleaved


def test_export_writes_the_theta_of_the_layers_that_rotate():
    """A model whose only RoPE layers are global R layers exports their base
    (global_rope_theta), not the sliding layers' rope_theta."""
    from rnope_megatron.model.config import RNoPEConfig

    cfg = RNoPEConfig(num_layers=2, pattern="GR", rope_theta=1e4, global_rope_theta=5e5)
    assert adapter_named("smollm3").to_hf(cfg)["rope_parameters"]["rope_theta"] == 5e5


def test_refusals_name_the_reason():
    cfg = adapter_of(COMMAND_R7B).from_hf(COMMAND_R7B)
    import dataclasses

    with pytest.raises(ValueError, match="QK-norm"):
        adapter_named("cohere2").to_hf(dataclasses.replace(cfg, qk_norm_global=True))
    with pytest.raises(ValueError, match="smollm3 needs block=sequential"):
        adapter_named("smollm3").to_hf(cfg)
    with pytest.raises(ValueError, match="sliding layers: the pattern may only use S and G"):
        adapter_named("cohere2").to_hf(dataclasses.replace(cfg, pattern="SSSR"))
    with pytest.raises(ValueError, match="sliding-window NoPE layer"):
        adapter_named("smollm3").from_hf(dict(SMOLLM3_3B, use_sliding_window=True,
                                              layer_types=["sliding_attention"] * 36, sliding_window=4096))
    with pytest.raises(ValueError, match="RoPE scaling 'yarn'"):
        adapter_named("smollm3").from_hf(dict(SMOLLM3_3B, rope_parameters={"rope_theta": 1.0, "rope_type": "yarn"}))
    bias = {"model.layers.0.self_attn.q_proj.bias": torch.zeros(1)}
    small = adapter_named("cohere2").from_hf(cohere2(layers=4).config.to_dict())
    state = dict(cohere2(layers=4).state_dict(), **bias)
    with pytest.raises(ValueError, match="cannot represent Hugging Face tensor model.layers.0.self_attn.q_proj.bias"):
        hf_to_megatron(adapter_named("cohere2"), small, state)


def test_cli_refuses_non_empty_output_and_truncated_input(tmp_path):
    hf_model = cohere2()
    hf_model.save_pretrained(tmp_path / "hf")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    out = run_cli("-m", "rnope_megatron.convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "busy"), check=False)
    assert out.returncode != 0 and "is not empty (use --force" in out.stderr and "Traceback" not in out.stderr
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = run_cli("-m", "rnope_megatron.convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "out"), check=False)
    assert out.returncode != 0 and "not a readable safetensors file" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("arch, interleaved", [("cohere2", False), ("smollm3", True)])
def test_export_across_rope_layouts_permutes_q_and_k(megatron_single, arch, interleaved):
    """A model trained with the other RoPE layout exports with q/k rows permuted per head:
    transformers' logits still equal ours."""
    from rnope_megatron.model.config import RNoPEConfig
    from rnope_megatron.model.layout_invariant_init import fill_from_global, seeded_full_tensor

    cohere = arch == "cohere2"
    cfg = RNoPEConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                      vocab_size=128, max_seq_length=128, window=8, pattern="SSSG", rotary_interleaved=interleaved,
                      block="parallel" if cohere else "sequential", normalization="LayerNorm" if cohere else "RMSNorm",
                      norm_eps=1e-5, logit_scale=0.5 if cohere else 1.0)
    ours = build_model(cfg, cfg.to_transformer_config()).eval()
    fill_from_global(ours, seeded_full_tensor(seed=5, std=0.08))
    adapter = adapter_named(arch)
    hf_cfg = adapter.to_hf(cfg)
    config_cls = Cohere2Config if cohere else SmolLM3Config
    hf_model = (Cohere2ForCausalLM if cohere else SmolLM3ForCausalLM)(config_cls(**dict(hf_cfg, pad_token_id=0))).eval()
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("_extra_state")}
    result = hf_model.load_state_dict(megatron_to_hf(adapter, cfg, state), strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys  # tied head
    ids = _ids(cfg.vocab_size, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ours(ids, torch.arange(SEQ).expand(2, -1), None), **TOL)
    back = hf_to_megatron(adapter, cfg, megatron_to_hf(adapter, cfg, state))
    assert all(torch.equal(back[k], state[k]) for k in back)  # the permutation inverts exactly


def test_weights_not_matching_config_fail_in_one_line(tmp_path):
    hf_model = cohere2()
    hf_model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["intermediate_size"] = 128  # the weights say 96
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    out = run_cli("-m", "rnope_megatron.convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "out"), check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("rnope-convert: ")
    # the preflight reads tensor shapes from the safetensors header before anything is
    # built: the line names the file, the field, the tensor and both shapes
    assert str(tmp_path / "hf" / "config.json") in last, last
    assert "intermediate_size = 128" in last and "model.layers.0.mlp.down_proj.weight" in last, last
    assert "[64, 96]" in last and "the config claims [64, 128]" in last, last
    assert not (tmp_path / "out").exists()


def test_byte_tokenizer_export_reads_text_as_training_did(tmp_path):
    """rnope-convert to-hf writes the built-in byte tokenizer as tokenizer.json: transformers'
    AutoTokenizer and our HFTokenizer give the byte values, end of document 256, and
    decode back, for text with multi-byte UTF-8, newlines and leading spaces."""
    from transformers import AutoTokenizer

    from rnope_megatron.convert.byte_tokenizer import write_byte_tokenizer
    from rnope_megatron.data.tokenizers import ByteTokenizer, HFTokenizer

    write_byte_tokenizer(tmp_path)
    text = "  The pass key is 12345.\nhéllo wörld ✓ \x00\x7f end"
    expected = ByteTokenizer().tokenize(text)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf(text)["input_ids"] == expected and hf.eos_token_id == 256
    assert hf.decode(expected) == text
    ours = HFTokenizer(str(tmp_path / "tokenizer.json"))
    assert ours.tokenize(text) == expected and ours.eod == 256
