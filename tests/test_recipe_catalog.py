"""Recipes travel with the package: a shipped recipe is taken by name (``rnope-train
8b/128k``) as well as by path, ``--list-recipes`` lists them, and a wheel built from
setup.py carries every recipe and section file (installed outside the checkout, it plans
``8b/128k`` by name). Console scripts are run installed, in subprocesses, as a user does."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from rnope_megatron.eval.loss import _data_section
from rnope_megatron.recipe import load_recipe, read_yaml
from rnope_megatron.recipe.catalog import SECTION_FOLDERS
from tests.trainer import ROOT, assert_one_line_error, console_script

RECIPES_DIR = ROOT / "recipes"
# every recipe in the checkout, by the name it is shipped under (the oracle for the listing)
ON_DISK = {p.relative_to(RECIPES_DIR).with_suffix("").as_posix(): p for p in sorted(RECIPES_DIR.rglob("*.yaml"))
           if p.relative_to(RECIPES_DIR).parts[0] not in SECTION_FOLDERS}


def script(name, *args, cwd, env=None):
    return subprocess.run([console_script(name), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=None if env is None else {**os.environ, **env})


def _table(stdout: str) -> dict[str, list[str]]:
    """name -> the other columns of a --list-recipes table."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines[0].split()[:4] == ["name", "scale", "stage", "seq_length"], stdout
    rows = {}
    for line in lines[1:]:
        name, scale, stage, seq, cluster = line.split(None, 4)
        rows[name] = [scale, stage, seq, cluster]
    return rows


@pytest.mark.parametrize("prog", ["rnope-train", "rnope-plan"])
def test_list_recipes_prints_every_shipped_recipe_with_scale_stage_and_cluster(prog, tmp_path):
    out = script(prog, "--list-recipes", cwd=tmp_path)  # outside the checkout
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _table(out.stdout)
    assert set(rows) == set(ON_DISK)
    assert {"8b/128k", "1b/pretrain-8k", "111b/256k", "tiny-cpu"} <= set(rows)
    for name, path in ON_DISK.items():
        recipe = load_recipe(path)
        c = recipe.cluster
        scale, _, stage = name.rpartition("/")
        assert rows[name] == [scale or "-", stage, str(recipe.train.seq_length),
                              f"{c.nodes} x {c.gpus_per_node} {c.gpu}"], name
    assert rows["8b/128k"] == ["8b", "128k", "131072", "32 x 8 h100"]


def test_a_name_plans_like_the_path_and_keeps_base_chains_and_section_files(tmp_path):
    """``8b/128k`` from a folder outside the checkout: a base chain down to pretrain-8k, the
    model and data section files and the baseline sibling all resolve in the shipped folder."""
    by_name = script("rnope-plan", "8b/128k", "--json", cwd=tmp_path)
    by_path = script("rnope-plan", RECIPES_DIR / "8b" / "128k.yaml", "--json", cwd=tmp_path)
    assert by_name.returncode == 0, by_name.stderr[-3000:]
    assert by_path.returncode == 0, by_path.stderr[-3000:]
    named, pathed = json.loads(by_name.stdout), json.loads(by_path.stdout)
    assert pathlib.Path(named["recipe"]).resolve() == (RECIPES_DIR / "8b" / "128k.yaml").resolve()
    assert named == pathed
    assert named["baseline"]["source"].endswith("baseline-128k.yaml")
    assert named["world_size"] == 256 and named["fits"]


def test_rnope_train_check_takes_a_name(tmp_path):
    out = script("rnope-train", "--check", "tiny-cpu", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tiny-cpu: recipe ok" in out.stdout


def test_a_file_that_exists_wins_over_a_shipped_name(tmp_path):
    """``8b/128k`` naming a file in the working directory is that file, not the shipped one."""
    (tmp_path / "8b").mkdir()
    shutil.copy(RECIPES_DIR / "tiny-cpu.yaml", tmp_path / "8b" / "128k")
    shutil.copytree(RECIPES_DIR / "models", tmp_path / "8b" / "models")
    out = script("rnope-plan", "8b/128k", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads(out.stdout)
    assert plan["recipe"] == "8b/128k" and plan["world_size"] == 1


@pytest.mark.parametrize("prog, args", [("rnope-train", ["8b/12k"]), ("rnope-train", ["--check", "8b/12k"]),
                                        ("rnope-plan", ["8b/12k"])])
def test_an_unknown_name_fails_in_one_line_naming_close_matches(prog, args, tmp_path):
    out = script(prog, *args, cwd=tmp_path)
    line = assert_one_line_error(out, prog, "8b/12k", "no shipped recipe", "8b/128k", "--list-recipes")
    assert "models/" not in line  # section files are not recipes


def test_rnope_eval_data_takes_a_name_and_an_unknown_one_fails_before_reading_the_checkpoint(tmp_path):
    out = script("rnope-eval", "loss", "--checkpoint", tmp_path / "no-checkpoint", "--data", "tiny-cpux",
                 "--length", "64", cwd=tmp_path)
    assert_one_line_error(out, "rnope-eval", "--data file not found: tiny-cpux", "close: tiny-cpu")


def _copy_source(dest: pathlib.Path) -> pathlib.Path:
    """What setup.py packages, copied so that building leaves nothing in the checkout."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "build")
    dest.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    for name in ("rnope_megatron", "recipes"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


def test_the_built_wheel_carries_the_recipes_and_plans_one_by_name_outside_the_checkout(tmp_path):
    source = _copy_source(tmp_path / "source")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            str(source), "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("rnope_megatron-*.whl")
    shipped = {n.removeprefix("rnope_megatron/recipes/") for n in zipfile.ZipFile(wheel).namelist()
               if n.startswith("rnope_megatron/recipes/") and n.endswith(".yaml")}
    # every recipe and section file, nested folders included
    assert shipped == {p.relative_to(RECIPES_DIR).as_posix() for p in RECIPES_DIR.rglob("*.yaml")}
    assert {"8b/128k.yaml", "models/paper-8b.yaml", "data/long-context.yaml", "tiny-cpu.yaml"} <= shipped

    target = tmp_path / "installed"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    # Dependencies come from this venv's site-packages; the package only from the install
    # (PYTHONPATH first on sys.path, the working directory outside the checkout).
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = ("import sys, rnope_megatron, rnope_megatron.plan.__main__ as plan; "
             "from rnope_megatron.recipe import catalog; "
             f"assert not any(p and pathlib.Path(p).resolve() == pathlib.Path({str(ROOT)!r}) for p in sys.path); "
             "print(rnope_megatron.__file__); print(plan.__file__); print(catalog.shipped_dir()); "
             "print(catalog.render(catalog.entries()))")
    out = subprocess.run([sys.executable, "-c", "import pathlib; " + probe], capture_output=True, text=True,
                         cwd=work, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    package_file, plan_file, recipes_dir, *table = out.stdout.splitlines()
    for path in (package_file, plan_file, recipes_dir):
        assert pathlib.Path(path).resolve().is_relative_to(target.resolve()), path
    assert set(_table("\n".join(table))) == set(ON_DISK)

    planned = subprocess.run([sys.executable, "-m", "rnope_megatron.plan", "8b/128k", "--json"],
                             capture_output=True, text=True, cwd=work, env=env, timeout=600)
    assert planned.returncode == 0, planned.stderr[-3000:]
    plan = json.loads(planned.stdout)
    assert pathlib.Path(plan["recipe"]).resolve() == (target / "rnope_megatron" / "recipes" / "8b" / "128k.yaml").resolve()
    assert plan["baseline"]["source"].endswith("baseline-128k.yaml") and plan["world_size"] == 256


def test_rnope_eval_data_section_of_a_shipped_name_is_that_recipes_section():
    assert _data_section("8b/128k") == read_yaml(RECIPES_DIR / "8b" / "128k.yaml")["data"]
    assert _data_section("8b/128k")["source"] == "indexed"  # from ../data/long-context.yaml
