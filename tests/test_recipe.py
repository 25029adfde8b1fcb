"""Recipes: typed loading, overrides, base chains, and bad recipes that fail
before any process group exists with one line naming the field."""

import pathlib
import subprocess
import sys

import pytest
import yaml

from rnope_megatron.recipe import RecipeError, load_recipe
from rnope_megatron.recipe.validation import validate

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny-cpu.yaml"


def test_tiny_recipe_loads_typed():
    recipe = load_recipe(TINY)
    assert recipe.model.pattern == "SSSG" and recipe.model.window == 64
    assert recipe.train.global_batch_size == 8 and isinstance(recipe.optimizer.lr, float)


def test_overrides_parse_yaml_scalars_and_floats_without_dot():
    recipe = load_recipe(TINY, ["train.iters=7", "optimizer.lr=3e-4", "parallel.sequence_parallel=true",
                                "parallel.tensor=2", "data.paths=[a, b]", "data.source=indexed"])
    assert recipe.train.iters == 7 and recipe.optimizer.lr == 3e-4
    assert recipe.parallel.sequence_parallel is True and recipe.data.paths == ["a", "b"]


def test_base_chains_inherit_and_cycles_fail_naming_the_chain(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"base": str(TINY), "train": {"iters": 11}}))
    recipe = load_recipe(child)
    assert recipe.train.iters == 11 and recipe.model.hidden_size == 128  # inherited
    grandchild = tmp_path / "grandchild.yaml"
    grandchild.write_text(yaml.safe_dump({"base": "child.yaml", "train": {"seq_length": 128}}))
    recipe = load_recipe(grandchild)  # a chain: grandchild -> child -> tiny-cpu
    assert (recipe.train.iters, recipe.train.seq_length, recipe.model.hidden_size) == (11, 128, 128)
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"base": "b.yaml"}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"base": "a.yaml"}))
    with pytest.raises(RecipeError, match=r"base chain is a cycle \(.*a.yaml -> .*b.yaml -> .*a.yaml\)"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text(yaml.safe_dump({"base": "self.yaml"}))
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "self.yaml")
    (tmp_path / "lost.yaml").write_text(yaml.safe_dump({"base": "nowhere.yaml"}))
    with pytest.raises(RecipeError, match="lost.yaml: base recipe not found: .*nowhere.yaml"):
        load_recipe(tmp_path / "lost.yaml")


BAD = [
    (["train.itres=5"], "unknown key train.itres"),
    (["modle.hidden_size=5"], "unknown section 'modle'"),
    (["model.hiden_size=5"], "unknown key model.hiden_size"),
    (["train.iters=ten"], "train.iters: expected int"),
    (["train.precision=fp8"], "train.precision: 'fp8' is not one of"),
    (["model.pattern=SSXG"], "model.pattern"),
    (["model.num_layers=6"], "does not tile num_layers=6"),
    (["parallel.pipeline=3"], "model.num_layers=8 is not divisible by parallel.pipeline"),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=3"], "virtual_pipeline = 6"),
    (["parallel.tensor=3"], "model.num_attention_heads=4 is not divisible by parallel.tensor=3"),
    (["parallel.tensor=3", "model.num_attention_heads=12", "model.num_query_groups=4", "model.hidden_size=192"],
     "model.num_query_groups=4 and parallel.tensor=3"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel needs parallel.tensor > 1"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size=10 is not a multiple"),
    (["train.seq_length=8192"], "train.seq_length=8192 exceeds model.max_seq_length=4096"),
    (["parallel.context=3"], "train.seq_length=256 must be divisible by 2 x parallel.context=6"),
    (["parallel.context=2", "parallel.context_comm_global=p2p"],
     "parallel.context_comm_global='p2p' is not available on train.backend=portable"),
    (["parallel.context=2", "parallel.context_comm_sliding=a2a"],
     "parallel.context_comm_sliding='a2a' is not available on train.backend=portable"),
    (["parallel.context=4", "train.backend=te", "parallel.context_comm_sliding=a2a"],
     "a2a splits heads over CP ranks: 4 query and 2 KV heads per TP rank are not divisible by parallel.context=4"),
    (["optimizer.min_lr=1"], "optimizer.min_lr=1.0 exceeds optimizer.lr"),
    (["scheduler.warmup_iters=100"], "scheduler.warmup_iters=100 must be below"),
    (["data.source=indexed"], "data.paths is empty"),
    (["data.retrieval_fraction=2"], "data.retrieval_fraction=2.0"),
    (["data.retrieval_tasks=[passkey, riddle]"], "data.retrieval_tasks=['passkey', 'riddle']: give one or more of"),
    (["data.retrieval_loss=some"], "data.retrieval_loss: 'some' is not one of ['all', 'answers']"),
    (["model.output_init_std=-1"], "model.output_init_std must be a positive number or null, got -1"),
    (["model.vocab_size=200"], "model.vocab_size=200 < 257"),
    (["checkpoint.keep=0"], "checkpoint.keep"),
    (["train.iters"], "not of the form section.key=value"),
    (["model.tie_embeddings=maybe"], "model.tie_embeddings: expected bool"),
    (["model.norm_eps=tiny"], "model.norm_eps: expected float"),
    (["parallel.tensor=2", "model.vocab_size=513"], "model.vocab_size=513 is not divisible by parallel.tensor=2"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_recipe_names_the_field(overrides, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_world_size_checks():
    recipe = load_recipe(TINY, ["parallel.tensor=2"])
    with pytest.raises(RecipeError, match="world size 3 is not divisible by parallel.tensor"):
        validate(recipe, world_size=3)
    with pytest.raises(RecipeError, match="micro_batch_size x data-parallel size = 4 x 4"):
        validate(recipe, world_size=8)
    validate(recipe, world_size=4)  # dp 2: 8 = 4 x 2


def test_cli_error_is_one_line_without_traceback():
    out = subprocess.run([sys.executable, "-m", "rnope_megatron.train", str(TINY), "parallel.tensor=3"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("rnope-train: bad recipe: model.num_attention_heads=4")
    missing = subprocess.run([sys.executable, "-m", "rnope_megatron.train", "nope.yaml"],
                             capture_output=True, text=True, cwd=ROOT)
    assert "recipe file not found: nope.yaml" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("name, world", [("pretrain-8k.yaml", 128), ("128k.yaml", 256)])
def test_cluster_recipes_validate_for_their_world_size(name, world):
    recipe = load_recipe(ROOT / "recipes" / "8b" / name)
    validate(recipe, world_size=world)
    if recipe.parallel.context > 1:
        types = recipe.model.cp_comm_types(recipe.parallel, recipe.train.backend)
        # sliding layers exchange halos (never TE's p2p/a2a+p2p, which refuse a window);
        # global layers use TE's ring (p2p), or gather K/V on the portable backend (the
        # long stages, whose packed documents run there under CP)
        assert all(t == "halo" for t, k in zip(types, recipe.model.layer_pattern.layers) if k == "S")
        global_ = "p2p" if recipe.train.backend == "te" else "all_gather"
        assert all(t == global_ for t, k in zip(types, recipe.model.layer_pattern.layers) if k == "G")
