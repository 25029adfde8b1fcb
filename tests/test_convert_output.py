"""rnope-convert never loses data: an output that is, contains or lies inside its input
is refused (``--force`` used to empty the directory before reading it), ``--force``
replaces only a previous rnope-convert output, and a failed conversion leaves nothing
behind (neither a half-written output nor its staging directory)."""

import pathlib
import subprocess

import pytest

from tests.trainer import ROOT, assert_one_line_error, console_script

transformers = pytest.importorskip("transformers")


def convert(*args):
    return subprocess.run([console_script("rnope-convert"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def snapshot(folder: pathlib.Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hf_and_megatron(tmp_path_factory):
    """A tiny Cohere2 model on disk and its rnope-convert import."""
    from tests.test_convert import cohere2

    root = tmp_path_factory.mktemp("convert-output")
    cohere2().save_pretrained(root / "hf")
    done = convert("from-hf", root / "hf", root / "mg")
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "hf", root / "mg"


@pytest.mark.parametrize("command, target", [
    ("to-hf", "input itself"), ("to-hf", "parent of the input"), ("from-hf", "input itself"),
    ("from-hf", "inside the input"),
])
def test_output_overlapping_the_input_is_refused_even_with_force(hf_and_megatron, command, target):
    hf, mg = hf_and_megatron
    source = mg if command == "to-hf" else hf
    out = {"input itself": source, "parent of the input": source / "..",
           "inside the input": source / "converted"}[target]
    before = snapshot(source.parent)
    result = convert(command, source, out, "--force")
    relation = {"input itself": "is", "parent of the input": "contains", "inside the input": "is inside"}[target]
    assert_one_line_error(result, "rnope-convert", f"{relation} the input")
    assert snapshot(source.parent) == before  # nothing deleted, nothing written


def test_force_replaces_only_a_previous_converter_output(hf_and_megatron, tmp_path):
    hf, mg = hf_and_megatron
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = convert("to-hf", mg, foreign, "--force")
    assert_one_line_error(result, "rnope-convert", "was not written by rnope-convert")
    assert (foreign / "notes.txt").read_text() == "keep me"

    out = tmp_path / "exported"
    assert convert("to-hf", mg, out, "--dtype", "fp32").returncode == 0
    (out / "notes.bin").write_text("the user's, added to an export")
    refused = convert("to-hf", mg, out)
    assert_one_line_error(refused, "rnope-convert", "is not empty (use --force")
    replaced = convert("to-hf", mg, out, "--dtype", "fp32", "--force")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    # the manifest lists what rnope-convert wrote: only that is replaced, the rest kept
    assert (out / "notes.bin").read_text() == "the user's, added to an export" and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "foreign"]  # no staging left


def test_a_failed_conversion_leaves_nothing_behind(hf_and_megatron, tmp_path):
    hf, _ = hf_and_megatron
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in hf.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = convert("from-hf", broken, tmp_path / "out")
    assert_one_line_error(result, "rnope-convert", "not a readable safetensors file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_wrongly_typed_config_fields_are_named(hf_and_megatron, tmp_path):
    import json

    hf, _ = hf_and_megatron
    for field, value, message in [("num_hidden_layers", "4", "field 'num_hidden_layers' must be int, got '4'"),
                                  ("sliding_window", [8], "field 'sliding_window' must be int"),
                                  ("logit_scale", "0.25", "field 'logit_scale' must be float")]:
        edited = tmp_path / field
        edited.mkdir()
        for item in hf.iterdir():
            (edited / item.name).write_bytes(item.read_bytes())
        config = json.loads((edited / "config.json").read_text())
        config[field] = value
        (edited / "config.json").write_text(json.dumps(config))
        result = convert("from-hf", edited, tmp_path / f"out-{field}")
        assert_one_line_error(result, "rnope-convert", "config.json", message)


def test_a_failed_replacement_puts_the_previous_output_back(tmp_path, monkeypatch):
    """If moving the new output into place fails after the old one was moved aside, the
    old one is restored under its name."""
    import pathlib as _pathlib

    from rnope_megatron.common.output import MARKER, staged_output

    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text('{"files": ["weights"]}')
    (out / "weights").write_text("previous")
    real_rename = _pathlib.Path.rename

    def failing_rename(self, target):
        if ".partial-" in self.name:
            raise OSError(28, "No space left on device", str(target))
        return real_rename(self, target)

    monkeypatch.setattr(_pathlib.Path, "rename", failing_rename)
    with pytest.raises(OSError):
        with staged_output(out, [tmp_path / "input"], True, {}) as stage:
            (stage / "weights").write_text("new")
    assert (out / "weights").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
