"""Every console script as a user runs it: the installed entry point in a subprocess,
its exit status and its output. Success exits 0; every failure a user can cause (a bad
recipe, file, value or id; a missing extra) ends in one line naming the file or field,
with a non-zero status, no traceback and nothing half-written."""

import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys

import numpy
import pytest

from rnope_megatron.data.preprocess import main as preprocess_main
from rnope_megatron.eval.cli import main as eval_main
from rnope_megatron.train.__main__ import main as train_main
from tests.trainer import FAST, RECIPE, ROOT, assert_one_line_error, console_script, refused

KNOWN_NOISE = ("UserWarning", "No CUDA runtime is found", "async save is deprecated", "pad token id")


def run(script, *args, env=None, timeout=600):
    return subprocess.run([console_script(script), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=None if env is None else {**os.environ, **env})


def test_installed_console_scripts_succeed_with_exit_status_0(tmp_path):
    """preprocess -> train -> eval -> convert, each through its installed script. (Their
    main() used to return a dict, which the console-script wrapper turned into exit 1.)"""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"document {i}: " + "lorem ipsum " * 30}) for i in range(100)))
    out = run("rnope-preprocess", "--input", docs, "--output-prefix", tmp_path / "corpus")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "100 documents" in out.stdout
    trained = run("rnope-train", RECIPE, *FAST, "train.iters=2", "scheduler.warmup_iters=1", "data.source=indexed",
                  f"data.paths=[{tmp_path / 'corpus'}]", f"data.cache_dir={tmp_path / 'cache'}",
                  f"logging.run_dir={tmp_path / 'run'}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "done at iteration 2" in trained.stdout
    # library warnings nobody can act on stay out of a plain run's output
    assert not [noise for noise in KNOWN_NOISE if noise in trained.stderr + trained.stdout], trained.stderr
    (tmp_path / "ids.json").write_text(json.dumps([[1, 2, 3, 4, 5, 6]]))
    evaluated = run("rnope-eval", "loss", "--checkpoint", tmp_path / "run" / "checkpoints",
                    "--input-ids", tmp_path / "ids.json", "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["tokens"] == 5
    converted = run("rnope-convert", "to-hf", tmp_path / "run" / "checkpoints", tmp_path / "hf", "--dtype", "fp32")
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert (tmp_path / "hf" / "config.json").is_file()


def test_psutil_is_installed_with_the_package():
    """Megatron's checkpoint writer imports psutil at the first save; a plain
    `pip install rnope-megatron` must bring it."""
    requirements = importlib.metadata.requires("rnope-megatron")
    assert any(r.split(";")[0].strip().startswith("psutil") and "extra" not in r for r in requirements), requirements


def test_convert_without_the_hf_extra_names_the_extra(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['safetensors'] = None  # not installed\n")
    out = run("rnope-convert", "to-hf", tmp_path / "ckpt", tmp_path / "out", env={"PYTHONPATH": str(blocker)})
    assert_one_line_error(out, "rnope-convert", "pip install 'rnope-megatron[hf]'", "safetensors")


def _recipe_cases(tmp_path):
    (tmp_path / "bad-yaml.yaml").write_text("model: [unclosed\n")
    (tmp_path / "a-list.yaml").write_text("- a\n- b\n")
    (tmp_path / "a-scalar.yaml").write_text("42\n")
    (tmp_path / "latin1.yaml").write_bytes("model:\n  pattern: SSSG # caf\xe9\n".encode("latin-1"))
    for name in ("bad-yaml", "a-list", "a-scalar"):
        (tmp_path / f"child-of-{name}.yaml").write_text(f"base: {name}.yaml\ntrain:\n  iters: 3\n")
    (tmp_path / "two-bases.yaml").write_text("base: [a.yaml, b.yaml]\n")
    return {
        "base-invalid-yaml": ([tmp_path / "child-of-bad-yaml.yaml"], ["bad-yaml.yaml: not valid YAML"]),
        "base-is-a-list": ([tmp_path / "child-of-a-list.yaml"], ["a-list.yaml: expected a mapping", "got a list"]),
        "base-is-a-scalar": ([tmp_path / "child-of-a-scalar.yaml"], ["a-scalar.yaml: expected a mapping", "got a int"]),
        "two-bases": ([tmp_path / "two-bases.yaml"], ["base must be one recipe file name"]),
        "not-utf8": ([tmp_path / "latin1.yaml"], ["latin1.yaml: not UTF-8 text"]),
        "tensor-2-in-one-process": ([RECIPE, "parallel.tensor=2"], ["world size 1 is not divisible", "torchrun"]),
        "lr-negative": ([RECIPE, "optimizer.lr=-1", "optimizer.min_lr=-2"], ["optimizer.lr=-1.0 must be > 0"]),
        "lr-nan": ([RECIPE, "optimizer.lr=.nan"], ["optimizer.lr=nan must be a finite number"]),
        "lr-inf": ([RECIPE, "optimizer.lr=.inf"], ["optimizer.lr=inf must be a finite number"]),
        "lr-zero": ([RECIPE, "optimizer.lr=0", "optimizer.min_lr=0"], ["optimizer.lr=0.0 must be > 0"]),
        "beta1-one": ([RECIPE, "optimizer.adam_beta1=1.0"], ["optimizer.adam_beta1=1.0 must be within [0, 1)"]),
        "beta1-negative": ([RECIPE, "optimizer.adam_beta1=-0.1"], ["optimizer.adam_beta1=-0.1 must be within"]),
        "clip-negative": ([RECIPE, "optimizer.clip_grad=-1"], ["optimizer.clip_grad=-1.0 must be >= 0"]),
        "warmup-negative": ([RECIPE, "scheduler.warmup_iters=-1"], ["scheduler.warmup_iters=-1 must be >= 0"]),
        "weights-negative": ([RECIPE, "data.source=indexed", "data.paths=[a, b]", "data.weights=[1, -1]"],
                             ["data.weights[1]=-1 must be a finite number >= 0"]),
        "data-path-missing": ([RECIPE, "data.source=indexed", f"data.paths=[{tmp_path / 'nope'}]"],
                              [f"data.paths[0]: {tmp_path / 'nope'}.bin does not exist"]),
        "tokenizer-missing": ([RECIPE, f"data.tokenizer={tmp_path / 'tokenizer.json'}"],
                              [f"data.tokenizer: {tmp_path / 'tokenizer.json'} does not exist"]),
        "override-not-yaml": ([RECIPE, "data.paths=[a"], ["override data.paths: '[a' is not a YAML value"]),
    }


RECIPE_CASES = [
    "base-invalid-yaml", "base-is-a-list", "base-is-a-scalar", "two-bases", "not-utf8", "tensor-2-in-one-process",
    "lr-negative", "lr-nan", "lr-inf", "lr-zero", "beta1-one", "beta1-negative", "clip-negative", "warmup-negative",
    "weights-negative", "data-path-missing", "tokenizer-missing", "override-not-yaml",
]


@pytest.mark.parametrize("case", RECIPE_CASES)
def test_bad_recipes_end_in_one_line(tmp_path, case):
    cases = _recipe_cases(tmp_path)
    assert sorted(cases) == sorted(RECIPE_CASES)
    args, fragments = cases[case]
    line = refused("rnope-train", train_main, *args, f"logging.run_dir={tmp_path / 'run'}",
                   installed=case == "lr-negative")
    assert line.startswith("rnope-train: bad recipe: ")
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert not (tmp_path / "run").exists()  # refused before anything was created


def _write_ids(path: pathlib.Path, content):
    if path.suffix == ".npy":
        numpy.save(path, content)
    else:
        path.write_text(content)


@pytest.mark.parametrize("name, content, fragment", [
    ("negative.json", "[[1, -2, 3]]", "token id -2 is negative"),
    ("nan.json", "[[1, NaN, 3]]", "token ids must be integers, found nan"),
    ("float.json", "[[1, 2.5, 3]]", "token ids must be integers, found 2.5"),
    ("bool.json", "[[true, false, true]]", "token ids must be integers, found True"),
    ("empty.json", "[]", "expected shape [batch >= 1, seq >= 2]"),
    ("ragged.json", "[[1, 2, 3], [4, 5]]", "rows have different lengths"),
    ("floats.npy", numpy.array([[1.0, 2.0, 3.0]]), "token ids must be integers, got dtype float64"),
    ("bools.npy", numpy.array([[True, False]]), "token ids must be integers, got dtype bool"),
])
def test_eval_refuses_ids_that_are_not_non_negative_integers(tmp_path, name, content, fragment):
    path = tmp_path / name
    _write_ids(path, content)
    line = refused("rnope-eval", eval_main, "loss", "--checkpoint", tmp_path / "no-checkpoint", "--input-ids", path,
                   installed=name == "negative.json")
    assert str(path) in line and fragment in line, line


@pytest.mark.parametrize("name, content, fragment", [
    ("latin1.txt", "caf\xe9".encode("latin-1"), "latin1.txt: not UTF-8 text"),
    ("latin1.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "latin1.jsonl:2: not UTF-8 text"),
    ("number.jsonl", b'{"text": 42}\n', "number.jsonl:1: 'text' must be a string, got int"),
    ("list.jsonl", b'["text"]\n', "list.jsonl:1: expected a JSON object, got list"),
    ("empty.jsonl", b"\n\n", "no documents in"),
    ("empty.txt", b"", "no documents in"),
])
def test_preprocess_refuses_bad_input_and_writes_nothing(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    line = refused("rnope-preprocess", preprocess_main, "--input", path, "--output-prefix", tmp_path / "out" / "corpus",
                   installed=name == "latin1.jsonl")
    assert fragment in line, line
    leftovers = list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else []
    assert leftovers == [], leftovers  # no dataset, no .tmp files


def test_examples_run_as_documented(tmp_path):
    """examples/train_single_node.sh uses the project's venv (not the system python) and
    takes its process count from NPROC, so a first override is not read as one;
    examples/build_and_inspect.py names the TE placeholder instead of printing a MagicMock."""
    out = subprocess.run(["bash", "examples/train_single_node.sh", RECIPE, *FAST, "train.iters=1",
                          "scheduler.warmup_iters=0", f"logging.run_dir={tmp_path}",
                          f"data.cache_dir={tmp_path / 'cache'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NPROC": "1", "PY": sys.executable})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "metrics.jsonl").is_file()
    inspect = subprocess.run([sys.executable, "examples/build_and_inspect.py"], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert inspect.returncode == 0, inspect.stderr[-3000:]
    assert "MagicMock" not in inspect.stdout
    assert "te spec, layer 1 core attention: TEDotProductAttention" in inspect.stdout


@pytest.mark.parametrize("groups_before", [False, True], ids=["none-before", "callers-groups-up"])
def test_one_line_errors_tears_down_only_the_groups_the_command_created(monkeypatch, groups_before):
    """A command's main() called from Python code that has its own process groups up (a
    notebook, this test session) leaves them up; a console script's own are torn down."""
    from rnope_megatron.common import cli

    torn_down = []
    monkeypatch.setattr(cli.dist, "is_initialized", lambda: groups_before)
    monkeypatch.setattr(cli, "shutdown_parallel", lambda: torn_down.append(True))
    with pytest.raises(SystemExit) as exited, cli.one_line_errors("rnope-x"):
        raise ValueError("bad\nvalue")
    assert exited.value.code == "rnope-x: bad value"
    assert torn_down == ([] if groups_before else [True])
