"""rnope-plan: every recipe fits its declared cluster, FLOPs against hand counts, the
paper's speed-ups, the trainer's own messages for bad layouts, a pinned JSON schema, and
the installed console script's exit status and output."""

import json
import subprocess

import numpy
import pytest

from rnope_megatron.model.config import RNoPEConfig
from rnope_megatron.model.flops import forward_flops_breakdown, training_flops_per_token
from rnope_megatron.plan.__main__ import main as plan_main
from rnope_megatron.plan.core import make_plan
from rnope_megatron.recipe import RecipeError, load_recipe
from rnope_megatron.recipe.validation import validate
from tests.trainer import ROOT, console_script, refused

SECTION_FOLDERS = {"models", "data"}  # section files, not recipes
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml")
                 if not SECTION_FOLDERS & set(p.relative_to(ROOT / "recipes").parts[:-1]))


def plan_cli(*args):
    return subprocess.run([console_script("rnope-plan"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_the_recipe_tree_has_every_scale_and_stage():
    names = {str(p.relative_to(ROOT / "recipes")) for p in RECIPES}
    stages = ["pretrain-8k", "32k", "64k", "128k", "256k"]
    for scale in ("1b", "3b", "8b", "111b"):
        assert {f"{scale}/{s}.yaml" for s in stages} <= names
    assert {f"8b/baseline-{s}.yaml" for s in stages} <= names
    assert "tiny-cpu.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_recipe_loads_validates_and_fits_its_declared_cluster(path):
    recipe = load_recipe(path)
    assert recipe.cluster.nodes is not None, "a recipe states the cluster it was planned for"
    plan = make_plan(recipe, path)
    assert plan["world_size"] == recipe.cluster.nodes * recipe.cluster.gpus_per_node
    assert plan["fits"] is True and plan["overflow"] is None, plan["memory_by_stage"]
    assert 0 < plan["memory_per_gpu_gb"] <= plan["usable_memory_gb"]
    if "/" in str(path.relative_to(ROOT / "recipes")):  # the cluster recipes plan for H100-80GB
        assert plan["gpu"] == "h100" and recipe.train.precision == "bf16"


def test_long_context_stages_load_the_previous_stage_without_rope_rescaling():
    stages = ["pretrain-8k", "32k", "64k", "128k", "256k"]
    for scale in ("1b", "3b", "8b", "111b"):
        recipes = [load_recipe(ROOT / "recipes" / scale / f"{s}.yaml") for s in stages]
        assert [r.train.seq_length for r in recipes] == [8192, 32768, 65536, 131072, 262144]
        assert all(r.model.max_seq_length == r.train.seq_length for r in recipes)
        for previous, stage in zip(recipes, recipes[1:]):
            assert stage.checkpoint.load == previous.checkpoint.dir and stage.checkpoint.dir != previous.checkpoint.dir
            assert stage.model.rope_theta == previous.model.rope_theta  # no rescaling
            assert dict(vars(stage.model), max_seq_length=0) == dict(vars(previous.model), max_seq_length=0)
            assert stage.data.retrieval_fraction > 0 and len(stage.data.paths) > len(recipes[0].data.paths)


# ------------------------------------------------------------------------- FLOPs

def brute_force_keys(seq: int, window: int | None) -> int:
    """Keys visible to all queries of a causal sequence, counted one by one."""
    return sum(1 for i in range(seq) for j in range(seq) if j <= i and (window is None or i - j < window))


def test_flops_equal_a_hand_count_for_a_small_mixed_shape():
    # 6 layers "SGR" x 2, h=64, 4 heads of 16, 2 KV heads, ffn 96, vocab 300, L=10, W=3
    model = RNoPEConfig(num_layers=6, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                        vocab_size=300, max_seq_length=16, pattern="SGR", window=3)
    qkv = 2 * 64 * (64 + 2 * 32)                 # per layer: q 64 + k 32 + v 32 columns
    out = 2 * 64 * 64
    mlp = 2 * (64 * 96 * 2 + 96 * 64)             # gate+up, down
    sliding = 4 * 64 * brute_force_keys(10, 3) / 10
    global_ = 4 * 64 * brute_force_keys(10, None) / 10
    head = 2 * 64 * 300
    parts = forward_flops_breakdown(model, 10)
    assert parts["qkv"] == 6 * qkv and parts["attention_out"] == 6 * out and parts["mlp"] == 6 * mlp
    assert parts["attention_sliding"] == pytest.approx(2 * sliding, rel=1e-12)  # layers 1 and 4
    assert parts["attention_global"] == pytest.approx(4 * global_, rel=1e-12)   # G and R layers
    assert parts["lm_head"] == head
    total = 3 * (6 * (qkv + out + mlp) + 2 * sliding + 4 * global_ + head)
    assert training_flops_per_token(model, 10) == pytest.approx(total, rel=1e-12)


def test_planner_flops_equal_a_hand_count_for_the_8b_at_64k():
    # whole sequences (the stage masks documents: priced per document, tested apart)
    plan = make_plan(load_recipe(ROOT / "recipes" / "8b" / "64k.yaml", ["data.document_mask=false"]),
                     ROOT / "recipes" / "8b" / "64k.yaml")
    h, L, W, V, seq = 4096, 32, 4096, 256000, 65536
    linear = 2 * (h * (h + 2 * 1024) + h * h + 3 * h * 14336)
    # keys per query, summed exactly: the first W-1 queries see i+1 keys, the rest W
    sliding_keys = sum(range(1, W)) + (seq - (W - 1)) * W
    global_keys = seq * (seq + 1) // 2
    attention = 24 * 4 * h * sliding_keys / seq + 8 * 4 * h * global_keys / seq
    expected = 3 * (L * linear + attention + 2 * h * V)
    assert plan["flops_per_token"] == pytest.approx(expected, rel=1e-12)
    assert plan["attention_flops_per_token"] == pytest.approx(3 * attention, rel=1e-12)
    # selective recompute runs core attention's forward twice
    assert plan["hardware_flops_per_token"] == pytest.approx(expected + attention, rel=1e-12)


@pytest.mark.parametrize("stage, paper", [("64k", 1.51), ("128k", 1.92)])
def test_predicted_speedup_of_the_8b_is_the_flop_bound(stage, paper):
    path = ROOT / "recipes" / "8b" / f"{stage}.yaml"
    # the paper's bound is for whole sequences: the stage's document masking off
    plan = make_plan(load_recipe(path, ["data.document_mask=false"]), path)
    assert plan["baseline"]["source"].endswith(f"baseline-{stage}.yaml")
    # The paper's FLOP bound: linear 2(h(h+2kv)+h·h+3h·ffn) per layer, attention 4·h·span with
    # span L/2 (global) and W (sliding), LM head 2hV; 8 of 32 layers global in the hybrid
    h, seq, W = 4096, {"64k": 65536, "128k": 131072}[stage], 4096
    linear = 2 * (h * (h + 2 * 1024) + h * h + 3 * h * 14336)
    baseline = 32 * (linear + 4 * h * seq / 2) + 2 * h * 256000
    hybrid = 32 * linear + 8 * 4 * h * seq / 2 + 24 * 4 * h * W + 2 * h * 256000
    assert plan["predicted_speedup_vs_baseline"] == pytest.approx(baseline / hybrid, rel=0.01)
    assert plan["predicted_speedup_vs_baseline"] == pytest.approx(paper, rel=0.01)


def test_the_trainer_logs_with_the_same_flop_model():
    from rnope_megatron.model import flops
    from rnope_megatron.train import loop

    assert loop.training_flops_per_token is flops.training_flops_per_token
    recipe = load_recipe(ROOT / "recipes" / "tiny-cpu.yaml")
    assert make_plan(recipe)["flops_per_token"] == flops.training_flops_per_token(recipe.model, 256)


# ------------------------------------------------------------------------- layouts

def test_layer_map_follows_megatrons_virtual_pipeline_assignment():
    path = ROOT / "recipes" / "111b" / "pretrain-8k.yaml"  # 64 layers, PP 8 x VPP 2
    stages = make_plan(load_recipe(path), path)["layer_map"]
    assert len(stages) == 8 and all(len(s["chunks"]) == 2 for s in stages)
    # chunk v of rank r holds 4 layers from v*32 + r*4 + 1
    assert [layer["layer"] for layer in stages[1]["chunks"][1]["layers"]] == [37, 38, 39, 40]
    assert [layer["kind"] for layer in stages[1]["chunks"][1]["layers"]] == ["S", "S", "S", "G"]
    assert [layer["rope"] for layer in stages[1]["chunks"][1]["layers"]] == [True, True, True, False]
    assert stages[0]["holds"] == ["embedding"] and stages[-1]["holds"] == ["output layer"]
    numbers = sorted(l["layer"] for s in stages for c in s["chunks"] for l in c["layers"])
    assert numbers == list(range(1, 65))


BAD = [
    ["parallel.tensor=3"],
    ["parallel.pipeline=3"],
    ["parallel.context=3"],
    ["train.global_batch_size=12"],
    ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "train.global_batch_size=12", "train.micro_batch_size=4"],
]


@pytest.mark.parametrize("overrides", BAD, ids=lambda o: " ".join(o))
def test_bad_layouts_fail_with_the_trainers_exact_message(overrides):
    recipe = ROOT / "recipes" / "tiny-cpu.yaml"
    try:  # what rnope-train says (its loader, then its world-size check for 2 GPUs)
        validate(load_recipe(recipe, overrides), world_size=2)
    except RecipeError as err:
        expected = f"rnope-plan: bad recipe: {err}"
    else:
        pytest.fail(f"{overrides} should be refused by the trainer")
    args = [recipe, *overrides, "--gpus-per-node", "2"]
    if overrides == BAD[0]:  # one case through the installed script: its whole stderr is the line
        out = plan_cli(*args)
        assert out.returncode == 1 and out.stderr.strip().splitlines() == [expected]
    else:
        assert refused("rnope-plan", plan_main, *args) == expected


def test_options_and_cluster_fields_are_checked_by_name():
    recipe = ROOT / "recipes" / "tiny-cpu.yaml"
    out = plan_cli(recipe, "--gpu", "a100")
    assert out.returncode == 1 and out.stderr.strip() == "rnope-plan: --gpu: unknown GPU 'a100' (known: h100, h200, b200)"
    out = plan_cli(recipe, "cluster.gpu=v100")
    assert out.returncode == 1 and "cluster.gpu: unknown GPU 'v100'" in out.stderr
    out = plan_cli(recipe, "cluster.nodes=null")
    assert out.returncode == 1 and out.stderr.strip() == "rnope-plan: cluster.nodes is not set in the recipe: pass --nodes N"


JSON_KEYS = {
    "recipe", "gpu", "nodes", "gpus_per_node", "world_size", "layout", "layer_map",
    "flops_per_token", "attention_flops_per_token", "flops_by_component", "hardware_flops_per_token",
    "memory_per_gpu_gb", "usable_memory_gb", "memory_by_stage", "fits", "overflow",
    "achieved_tflops", "pipeline_bubble", "step_time_s", "tokens_per_s", "mfu",
    "baseline", "predicted_speedup_vs_baseline", "documents",
}


def test_installed_script_prints_a_stable_json_object_and_exits_0_when_it_fits():
    # whole sequences: the paper's FLOP bound (the stage's document masking off)
    out = plan_cli(ROOT / "recipes" / "8b" / "128k.yaml", "--json", "--achieved-tflops", "400",
                   "data.document_mask=false")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert set(plan) == JSON_KEYS and plan["documents"] is None
    assert plan["fits"] is True and plan["world_size"] == 256 and plan["layout"]["data"] == 4
    assert plan["predicted_speedup_vs_baseline"] == pytest.approx(1.92, rel=0.01)
    # 32 sequences x 131072 tokens at 400 TFLOP/s on 256 GPUs (+ the 1F1B bubble of PP 2)
    m = 32 // 4
    step = 32 * 131072 * plan["hardware_flops_per_token"] / (256 * 400e12) * (1 + 1 / m)
    assert plan["step_time_s"] == pytest.approx(step, rel=1e-9)
    assert plan["tokens_per_s"] == pytest.approx(32 * 131072 / step, rel=1e-9)
    assert {s["pipeline_rank"] for s in plan["memory_by_stage"]} == {0, 1}


def test_a_layout_that_does_not_fit_names_the_overflowing_component():
    # the 8B at 128k on one 8-GPU node, TP 8, no CP: 128k tokens of activations per GPU
    out = plan_cli(ROOT / "recipes" / "8b" / "128k.yaml", "parallel.context=1", "parallel.tensor=8",
                   "parallel.pipeline=1", "train.global_batch_size=8", "--nodes", "1", "--json")
    assert out.returncode == 3, out.stderr
    plan = json.loads(out.stdout)
    assert plan["fits"] is False and plan["overflow"]["component"] == "activations"
    assert plan["overflow"]["over_by_gb"] == pytest.approx(plan["memory_per_gpu_gb"] - plan["usable_memory_gb"], abs=0.01)
    text = plan_cli(ROOT / "recipes" / "8b" / "128k.yaml", "parallel.context=1", "parallel.tensor=8",
                    "parallel.pipeline=1", "train.global_batch_size=8", "--nodes", "1")
    assert text.returncode == 3 and "fits: NO" in text.stdout and "largest component activations" in text.stdout
    # on a B200 (180 GB) with full recompute it fits
    out = plan_cli(ROOT / "recipes" / "8b" / "128k.yaml", "parallel.context=1", "parallel.tensor=8",
                   "parallel.pipeline=1", "train.global_batch_size=8", "train.recompute=full", "--nodes", "1",
                   "--gpu", "b200", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["fits"] is True, out.stdout[-500:]


def test_text_report_shows_the_layer_map_memory_and_speedup():
    out = plan_cli(ROOT / "recipes" / "8b" / "64k.yaml", "data.document_mask=false")
    assert out.returncode == 0, out.stderr
    assert "pipeline rank 0: chunk 0: layers 1-16 SSSGSSSGSSSGSSSG + embedding" in out.stdout
    assert "optimizer without the distributed optimizer" in out.stdout
    assert "predicted speed-up over the all-global RoPE baseline" in out.stdout and "x1.52" in out.stdout
    # as shipped (documents masked, 2048-token documents assumed): the baseline attends
    # within documents too, so the hybrid's FLOP advantage nearly vanishes
    masked = plan_cli(ROOT / "recipes" / "8b" / "64k.yaml")
    assert masked.returncode == 0, masked.stderr
    assert "document masking: attention per document, mean" in masked.stdout
    assert "lengths from data.mean_document_length=2048" in masked.stdout


def test_document_masked_attention_is_priced_from_the_document_index(tmp_path):
    """With data.document_mask rnope-plan reads the indexed dataset's document lengths and
    prices attention per document: for documents of one length d (= the window's multiple
    here) every simulated sequence is d-long pieces, so the price is pack_forward_flops of
    those pieces; data.mean_document_length gives the same when the files are absent;
    neither: priced as without masking, and said so."""
    from rnope_megatron.data.indexed import write_indexed
    from rnope_megatron.model.flops import pack_forward_flops

    seq, doc = 8192, 1024
    write_indexed(tmp_path / "docs", [numpy.full(doc, 7, dtype=numpy.int32)] * 200, 50_000)
    common = ["data.source=indexed", f"data.paths=[{tmp_path / 'docs'}]", "data.weights=null", "data.document_mask=true",
              "data.retrieval_fraction=0", "data.tokenizer=bytes", "model.vocab_size=50000"]
    recipe = load_recipe("recipes/1b/pretrain-8k.yaml", common)
    plan = make_plan(recipe)
    # documents of one length, cut every seq tokens: each sequence is 8 whole documents
    expected = 3 * pack_forward_flops(recipe.model, [doc] * (seq // doc)) / seq
    assert plan["flops_per_token"] == pytest.approx(expected, rel=1e-9)
    assert plan["documents"]["mean_document_length"] == doc
    assert "document index" in plan["documents"]["source"]
    unmasked = make_plan(load_recipe("recipes/1b/pretrain-8k.yaml", [*common, "data.document_mask=false"]))
    assert plan["flops_per_token"] < unmasked["flops_per_token"] and unmasked["documents"] is None
    assert plan["baseline"]["flops_per_token"] < unmasked["baseline"]["flops_per_token"]

    by_field = make_plan(load_recipe("recipes/1b/pretrain-8k.yaml",
                                     [*common[:1], f"data.paths=[{tmp_path / 'absent'}]", *common[2:],
                                      f"data.mean_document_length={doc}"]))
    assert by_field["documents"]["source"] == f"data.mean_document_length={doc}"
    # the first document is cut at a random offset, so pieces differ: within 2% of whole documents
    assert by_field["flops_per_token"] == pytest.approx(expected, rel=0.02)

    out = plan_cli("recipes/1b/pretrain-8k.yaml", *common[:1], f"data.paths=[{tmp_path / 'absent'}]", *common[2:])
    assert out.returncode == 0, out.stderr
    assert "document masking: no document lengths" in out.stdout and "priced as without masking" in out.stdout
