"""FP8 on the te backend, checked on CPU (TE absent: Megatron's TE classes are
placeholders, so what runs here is the logic deciding what TE gets).

* a table of recipes x GPU architectures -> each layer's FP8 linears / FP8 attention, the
  TransformerConfig fields and the core-attention class each layer's spec gets;
* every refusal's exact message, before any process group;
* the bf16-attention wrapper enters a disabled TE autocast with the enclosing recipe;
* ``rnope-train --check --gpu ...`` as the installed console script.
"""

import dataclasses
import subprocess
import sys
import types

import pytest
import torch

from rnope_megatron.common import gpus
from rnope_megatron.model.precision import Platform, plan_precision
from rnope_megatron.recipe import RecipeError, load_recipe
from rnope_megatron.train.console import describe_attention
from tests.trainer import RECIPE, ROOT, assert_one_line_error, console_script

FP8 = ["train.backend=te", "train.precision=bf16", "model.num_layers=8"]
CLUSTER = str(ROOT / "recipes" / "8b" / "pretrain-8k.yaml")


def fp8_recipe(*overrides):
    return load_recipe(RECIPE, [*FP8, *overrides])


def on(name, **versions):
    return Platform(gpus.by_name(name), **versions)


S_LAYERS, G_LAYERS, ALL = {1, 2, 3, 5, 6, 7}, {4, 8}, set(range(1, 9))

# (gpu, platform versions, overrides) -> (fp8 attention layers, fp8 linear layers, bf16-wrapped attention layers)
TABLE = [
    ("h100", {}, ["train.fp8.recipe=delayed", "train.fp8.attention=global_only"], G_LAYERS, ALL, S_LAYERS),
    ("h100", {}, ["train.fp8.recipe=delayed", "train.fp8.attention=auto"], G_LAYERS, ALL, S_LAYERS),
    ("h200", {}, ["train.fp8.recipe=delayed", "train.fp8.attention=off"], set(), ALL, set()),
    ("h100", {}, ["train.fp8.recipe=tensorwise", "train.fp8.attention=auto"], set(), ALL, set()),
    ("h100", {}, ["train.fp8.recipe=blockwise", "train.fp8.attention=auto"], set(), ALL, set()),
    ("h100", {}, ["train.fp8.recipe=tensorwise", "train.fp8.bf16_first_last_layers=1"], set(), ALL - {1, 8}, set()),
    ("b200", {}, ["train.fp8.recipe=tensorwise", "train.fp8.attention=auto", "train.fp8.bf16_first_last_layers=1"],
     ALL - {1, 8}, ALL - {1, 8}, set()),
    ("b200", {}, ["train.fp8.recipe=delayed", "train.fp8.attention=global_only"], G_LAYERS, ALL, S_LAYERS),
    ("b200", {}, ["train.fp8.recipe=mxfp8", "train.fp8.attention=all"], ALL, ALL, set()),
    ("b200", {}, ["train.fp8.recipe=blockwise", "train.fp8.attention=auto"], set(), ALL, set()),
    # TE 2.10 on Blackwell: tensorwise FP8 attention exists, with a window not yet (2.16)
    ("b200", {"te_version": (2, 10)}, ["train.fp8.recipe=tensorwise", "train.fp8.attention=auto"],
     G_LAYERS, ALL, S_LAYERS),
    ("b200", {"cudnn_version": (9, 10)}, ["train.fp8.recipe=delayed", "train.fp8.attention=auto"],
     G_LAYERS, ALL, S_LAYERS),
    # an all-global NoPE model has no window anywhere: FP8 attention on every layer on Hopper
    ("h100", {}, ["train.fp8.recipe=delayed", "train.fp8.attention=all", "model.pattern=G"], ALL, ALL, set()),
]


@pytest.mark.parametrize("gpu, versions, overrides, fp8_attention, fp8_linears, wrapped", TABLE)
def test_policy_table(gpu, versions, overrides, fp8_attention, fp8_linears, wrapped):
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.fp8_utils import is_first_last_bf16_layer

    from rnope_megatron.attention.te_precision import BF16AttentionTEDotProductAttention
    from rnope_megatron.model.specs import block_spec

    recipe = fp8_recipe(*overrides)
    plan = plan_precision(recipe, on(gpu, **versions))
    assert {layer.number for layer in plan.layers if layer.fp8_attention} == fp8_attention
    assert {layer.number for layer in plan.layers if layer.fp8_linears} == fp8_linears
    assert plan.bf16_attention_layers() == wrapped
    # what Megatron gets: the FP8 fields, and its own first/last-bf16 rule agrees with ours
    config = recipe.model.to_transformer_config(recipe.parallel, params_dtype="bf16", backend="te",
                                                **plan.transformer_config_fields())
    fp8 = recipe.train.fp8
    assert (config.fp8, config.fp8_recipe) == (fp8.format, fp8.recipe)
    assert config.fp8_dot_product_attention is bool(fp8_attention)
    assert {n for n in ALL if not is_first_last_bf16_layer(config, n - 1)} == fp8_linears
    # what each layer's spec gets: Megatron's TE attention, or ours keeping bf16 attention
    specs = block_spec(recipe.model, config, "te", pp_rank=0, bf16_attention_layers=plan.bf16_attention_layers())
    for number, spec in enumerate(specs.layer_specs, start=1):
        core = spec.submodules.self_attention.submodules.core_attention
        expected = BF16AttentionTEDotProductAttention if number in wrapped else te_ext.TEDotProductAttention
        assert core is expected, number
        # an FP8-attention layer must not be wrapped, and every FP8-linear layer without FP8
        # attention must be, whenever the recipe turns FP8 attention on
        if config.fp8_dot_product_attention and number in fp8_linears:
            assert (core is expected) and ((number in fp8_attention) != (number in wrapped))


def test_halo_layers_under_cp_get_the_bf16_halo_wrapper():
    """128k stage on Hopper: sliding layers exchange halos and keep bf16 attention; the
    global ones use TE's ring CP with FP8 attention."""
    from megatron.core.extensions import transformer_engine as te_ext

    from rnope_megatron.attention.te_precision import BF16AttentionHaloTEDotProductAttention
    from rnope_megatron.model.specs import block_spec

    recipe = fp8_recipe("train.fp8.recipe=delayed", "train.fp8.attention=global_only", "parallel.context=2")
    plan = plan_precision(recipe, on("h100"))
    config = recipe.model.to_transformer_config(recipe.parallel, params_dtype="bf16", backend="te",
                                                **plan.transformer_config_fields())
    specs = block_spec(recipe.model, config, "te", pp_rank=0, bf16_attention_layers=plan.bf16_attention_layers())
    cores = [s.submodules.self_attention.submodules.core_attention for s in specs.layer_specs]
    assert cores == [BF16AttentionHaloTEDotProductAttention] * 3 + [te_ext.TEDotProductAttention] \
        + [BF16AttentionHaloTEDotProductAttention] * 3 + [te_ext.TEDotProductAttention]


def test_without_fp8_nothing_changes():
    recipe = load_recipe(RECIPE)
    plan = plan_precision(recipe, None)
    assert plan.transformer_config_fields() == {} and plan.bf16_attention_layers() == frozenset()
    assert not any(layer.fp8_linears or layer.fp8_attention for layer in plan.layers)


def test_engine_passes_the_plan_to_megatron():
    """Engine's TransformerConfig carries the plan's FP8 fields (Engine built by hand: no
    process group needed for this step)."""
    from rnope_megatron.train.engine import Engine

    recipe = fp8_recipe("train.fp8.recipe=tensorwise", "train.fp8.bf16_first_last_layers=2", "train.fusions=false")
    engine = Engine.__new__(Engine)
    engine.recipe = recipe
    engine.precision = plan_precision(recipe, on("b200"))
    config = engine._transformer_config()
    assert (config.fp8, config.fp8_recipe, config.first_last_layers_bf16) == ("hybrid", "tensorwise", True)
    assert (config.num_layers_at_start_in_bf16, config.num_layers_at_end_in_bf16) == (2, 2)
    assert config.fp8_dot_product_attention is False  # attention: off, the default


def test_start_line_names_backend_and_precision_per_layer_kind():
    recipe = fp8_recipe("train.fp8.recipe=tensorwise", "train.fp8.attention=auto",
                        "train.fp8.bf16_first_last_layers=1", "model.window=32")
    assert describe_attention(recipe.model, "te", plan_precision(recipe, on("b200"))) == (
        "attention: S layers (1-3,5-7): te, window 32, fp8 attention (fused) (bf16 on 1), fp8 linears (bf16 on 1); "
        "G layers (4,8): te, no RoPE, fp8 attention (fused) (bf16 on 8), fp8 linears (bf16 on 8)")
    recipe = fp8_recipe("train.fp8.recipe=delayed", "train.fp8.attention=global_only", "model.window=32")
    assert describe_attention(recipe.model, "te", plan_precision(recipe, on("h100"))) == (
        "attention: S layers (1-3,5-7): te, window 32, bf16 attention, fp8 linears; "
        "G layers (4,8): te, no RoPE, fp8 attention (fused), fp8 linears")


REFUSALS = [
    # (overrides, gpu or None, exact message)
    (["train.backend=portable", "train.fp8.recipe=delayed"], "h100",
     "train.fp8: FP8 runs through Transformer Engine: needs train.backend=te (got portable)"),
    (["train.precision=fp32", "train.fp8.recipe=delayed"], "h100", "train.fp8: needs train.precision=bf16 (got fp32)"),
    (["train.fp8.recipe=mxfp8"], "h100", "train.fp8.recipe=mxfp8: Blackwell (sm100+) only; h100 is sm90"),
    (["train.fp8.recipe=delayed", "train.fp8.bf16_first_last_layers=1"], "h100",
     "train.fp8.bf16_first_last_layers=1: not available with train.fp8.recipe=delayed (its amax reduction spans "
     "the whole block; Megatron refuses it)"),
    (["train.fp8.bf16_first_last_layers=4"], "h100",
     "train.fp8.bf16_first_last_layers=4 leaves no FP8 layer of model.num_layers=8"),
    (["train.fp8.recipe=delayed", "train.fp8.attention=all"], "h100",
     "train.fp8.attention=all: FP8 attention on sliding layer 1 (S): no TE backend runs FP8 attention with a "
     "sliding window below sm100 (h100 is sm90)"),
    (["train.fp8.recipe=tensorwise", "train.fp8.attention=global_only"], "h200",
     "train.fp8.attention=global_only: FP8 attention on global layer 4 (G): TE refuses tensorwise "
     "(current-scaling) FP8 attention below sm100 (h200 is sm90)"),
    (["train.fp8.recipe=blockwise", "train.fp8.attention=global_only"], "b200",
     "train.fp8.attention=global_only: FP8 attention on global layer 4 (G): the blockwise recipe has no FP8 "
     "attention (TE's Float8BlockScaling refuses fp8_dpa)"),
    (["train.fp8.recipe=delayed", "model.hidden_size=72"], "h100",
     "train.fp8.recipe=delayed: model.hidden_size = 72 is not a multiple of 16 (TE's FP8 GEMMs)"),
    (["train.fp8.recipe=mxfp8", "train.seq_length=48", "train.micro_batch_size=1", "model.window=16"],
     "b200", "train.fp8.recipe=mxfp8: 48 tokens per micro-batch per rank (train.seq_length x micro_batch_size / "
     "parallel sizes) is not a multiple of 32"),
    (["train.fp8.recipe=delayed"], None,
     "train.fp8: the GPU is unknown (no CUDA device here): run on a GPU, or check the recipe with rnope-train "
     "--check --gpu h100|h200|b200"),
    (["train.fp8.recipe=fp4"], "h100", "train.fp8.recipe: 'fp4' is not one of ['delayed', 'tensorwise', "
     "'blockwise', 'mxfp8']"),
    (["train.fp8.recipes=delayed"], "h100",
     "unknown key train.fp8.recipes (known: attention, bf16_first_last_layers, format, recipe)"),
]


@pytest.mark.parametrize("overrides, gpu, message", REFUSALS)
def test_refusals_name_the_field(overrides, gpu, message):
    with pytest.raises(RecipeError) as err:
        plan_precision(fp8_recipe(*overrides), on(gpu) if gpu else None)
    assert str(err.value) == message


def test_refusals_that_depend_on_the_machine():
    old_gpu = Platform(dataclasses.replace(gpus.by_name("h100"), name="a100", compute_capability=(8, 0)))
    with pytest.raises(RecipeError, match=r"^train.fp8: a100 \(sm80\) has no FP8 tensor cores \(needs sm89 or newer\)$"):
        plan_precision(fp8_recipe("train.fp8.recipe=tensorwise"), old_gpu)
    # FP8 attention under TE's all_gather CP exists from TE 2.16 only
    recipe = fp8_recipe("train.fp8.recipe=delayed", "train.fp8.attention=global_only", "parallel.context=2",
                        "parallel.context_comm_global=all_gather")
    assert plan_precision(recipe, on("h100")).fp8_attention_anywhere  # versions unknown: assumed recent
    with pytest.raises(RecipeError, match=r"^train.fp8.attention=global_only: FP8 attention on global layer 4 "
                                          r"\(G\): FP8 attention under all_gather context parallelism needs TE >= 2.16$"):
        plan_precision(recipe, on("h100", te_version=(2, 12)))
    with pytest.raises(RecipeError, match=r"^train.fp8.attention=all: .*needs TE >= 2.16 and cuDNN >= 9.21$"):
        plan_precision(fp8_recipe("train.fp8.recipe=delayed", "train.fp8.attention=all"),
                       on("b200", cudnn_version=(9, 10)))


def test_null_section_can_be_switched_on_by_an_override(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"base: {RECIPE}\ntrain:\n  fp8: null\n  backend: te\n  precision: bf16\n")
    assert load_recipe(path).train.fp8 is None
    assert load_recipe(path, ["train.fp8.recipe=delayed"]).train.fp8.recipe == "delayed"


# --------------------------------------------------------------------------- the bf16 wrapper

def test_bf16_wrapper_runs_attention_inside_a_disabled_autocast_with_the_enclosing_recipe(monkeypatch):
    """With a stand-in ``transformer_engine`` module: the wrapper enters TE's autocast with
    enabled=False, the enclosing recipe and amax group, and calls the wrapped forward inside."""
    from rnope_megatron.attention import te_precision

    events, recipe, group = [], object(), object()

    class Autocast:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def __enter__(self):
            events.append(("enter", self.kwargs))

        def __exit__(self, *exc):
            events.append(("exit",))

    state = types.SimpleNamespace(get_fp8_recipe=lambda: recipe, get_fp8_group=lambda: group)
    te = types.ModuleType("transformer_engine")
    te.pytorch = types.ModuleType("transformer_engine.pytorch")
    te.pytorch.autocast = Autocast
    te.pytorch.fp8 = types.ModuleType("transformer_engine.pytorch.fp8")
    te.pytorch.fp8.FP8GlobalStateManager = state
    monkeypatch.setitem(sys.modules, "transformer_engine", te)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te.pytorch)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch.fp8", te.pytorch.fp8)

    class Attention:  # stands in for TEDotProductAttention
        def forward(self, query, key, value, *args, **kwargs):
            events.append(("attention", query))
            return query + 1

    class Wrapped(te_precision._BF16Attention, Attention):
        pass

    out = Wrapped().forward(torch.zeros(2), None, None, None, None)
    assert torch.equal(out, torch.ones(2))
    assert [e[0] for e in events] == ["enter", "attention", "exit"]
    assert events[0][1] == {"enabled": False, "recipe": recipe, "amax_reduction_group": group}
    # classes in the specs keep Megatron's TE attention (or the halo one) in their MRO
    assert te_precision.HaloTEDotProductAttention in te_precision.BF16AttentionHaloTEDotProductAttention.__mro__


def test_bf16_wrapper_without_transformer_engine_says_what_to_install():
    from rnope_megatron.attention.te_halo import _te_available
    from rnope_megatron.attention.te_precision import BF16AttentionTEDotProductAttention
    from tests.support import tiny_config

    if _te_available():
        pytest.skip("Transformer Engine is installed")
    config = tiny_config().to_transformer_config(backend="te")
    with pytest.raises(RuntimeError, match=r"BF16AttentionTEDotProductAttention needs Transformer Engine"):
        BF16AttentionTEDotProductAttention(config, 1, None)


# --------------------------------------------------------------------------- the CLI

def rnope_train(*args):
    return subprocess.run([console_script("rnope-train"), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_check_prints_the_per_layer_policy_of_a_cluster_recipe():
    """The 8B cluster recipe on Hopper: FP8 linears everywhere, FP8 attention on the global
    layers only."""
    proc = rnope_train("--check", "--gpu", "h100", CLUSTER)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"rnope-train: {CLUSTER}: recipe ok for h100 (sm90)")
    assert lines[1] == (
        "attention: S layers (1-3,5-7,9-11,13-15,17-19,21-23,25-27,29-31): te, window 4096, bf16 attention, "
        "fp8 linears; G layers (4,8,12,16,20,24,28,32): te, no RoPE, fp8 attention (fused), fp8 linears")
    assert lines[2] == ("layer   1  S  linears fp8  attention bf16  (no TE backend runs FP8 attention with a "
                        "sliding window below sm100 (h100 is sm90))")
    assert lines[5] == "layer   4  G  linears fp8  attention fp8"
    assert len(lines) == 2 + 32


def test_check_refuses_fp8_attention_on_sliding_layers_on_hopper():
    proc = rnope_train("--check", "--gpu=h100", CLUSTER, "train.fp8.attention=all")
    assert_one_line_error(proc, "rnope-train", "bad recipe: train.fp8.attention=all: FP8 attention on sliding "
                                               "layer 1 (S): no TE backend runs FP8 attention with a sliding window")
    assert proc.stdout == ""
    unknown = rnope_train("--check", "--gpu", "a100", CLUSTER)
    assert_one_line_error(unknown, "rnope-train", "--gpu: unknown GPU 'a100' (known: h100, h200, b200)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fp8_without_a_gpu_asks_for_one():
    proc = rnope_train("--check", CLUSTER)
    assert_one_line_error(proc, "rnope-train", "train.fp8: FP8 support depends on the GPU", "pass --gpu")
    launch = rnope_train(RECIPE, *FP8, "train.fp8.recipe=delayed")
    assert_one_line_error(launch, "rnope-train", "train.fp8: the GPU is unknown (no CUDA device here)")
    plain = rnope_train("--check", RECIPE)  # no FP8: no GPU needed
    assert plain.returncode == 0 and "G layers (4,8): portable, no RoPE, fp32 attention" in plain.stdout


@pytest.mark.parametrize("name", ["pretrain-8k.yaml", "32k.yaml", "64k.yaml", "128k.yaml", "256k.yaml"])
@pytest.mark.parametrize("gpu", ["h100", "h200", "b200"])
def test_cluster_recipes_use_fp8_linears_and_bf16_attention_on_sliding_layers(name, gpu):
    recipe = load_recipe(ROOT / "recipes" / "8b" / name)
    plan = plan_precision(recipe, on(gpu))
    if recipe.data.document_mask:
        # the long stages pack documents under CP: the portable backend, bf16 (FP8 is TE's)
        assert recipe.train.backend == "portable" and recipe.train.fp8 is None
        assert not any(layer.fp8_linears or layer.fp8_attention for layer in plan.layers)
        return
    assert all(layer.fp8_linears for layer in plan.layers)
    assert all(layer.fp8_attention is (layer.letter == "G") for layer in plan.layers)
    assert plan.bf16_attention_layers() == {layer.number for layer in plan.layers if layer.letter == "S"}
