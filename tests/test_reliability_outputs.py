"""Nothing lost by the commands' outputs (issue 21, conversion / quantization / eval /
preprocess items), each through the installed console script as a user runs it: exit
status, one line naming the file or field, the inputs' bytes unchanged, no file left
behind (neither a partial output nor an empty one).

One tiny fp32 SmolLM3 (vocab 320, so the byte tokenizer fits) imported once is the input
of every test; kills happen at exact points (``RNOPE_FAULT``), a full disk is a small
tmpfs (skipped where it cannot be mounted).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import resource
import shutil
import subprocess

import pytest

from tests.trainer import ROOT, assert_one_line_error, console_script

transformers = pytest.importorskip("transformers")

DEAD_PID = 4194305  # above Linux's largest pid_max: never a running process
MEMORY_CAP = 16 * 2**30  # a test that regresses fails with MemoryError, not the machine


def run(prog, *args, env=None, cap_memory=False):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    return subprocess.run([console_script(prog), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=900, env=None if env is None else {**os.environ, **env},
                          preexec_fn=limit if cap_memory else None)


def hashes(*roots) -> dict:
    """sha256 of every file under ``roots`` (hidden ones too): what must not change."""
    out = {}
    for root in map(pathlib.Path, roots):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        out.update({str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    return out


def leftovers(folder) -> list[str]:
    """Partial outputs and empty files anywhere under ``folder``."""
    return sorted(str(p) for p in pathlib.Path(folder).rglob("*")
                  if ".partial-" in p.name or ".replaced-" in p.name or p.name.endswith(".tmp")
                  or (p.is_file() and p.stat().st_size == 0))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(HF directory of a tiny fp32 SmolLM3, its rnope-convert import)."""
    from tests.test_convert import smollm3

    root = tmp_path_factory.mktemp("reliability")
    smollm3(vocab=320).save_pretrained(root / "hf")
    done = run("rnope-convert", "from-hf", root / "hf", root / "mg")
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "hf", root / "mg"


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """``rnope-convert to-hf`` of the import, without --dtype (and its stdout)."""
    out = tmp_path_factory.mktemp("exported") / "hf-out"
    done = run("rnope-convert", "to-hf", models[1], out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


@pytest.fixture(scope="module")
def quantized(models, tmp_path_factory):
    """``rnope-quantize`` of the import (fp8, a few samples) with its --hf export."""
    pytest.importorskip("modelopt")
    base = tmp_path_factory.mktemp("quantized")
    done = run("rnope-quantize", models[1], base / "q", "--format", "fp8", "--calib-samples", "2",
               "--eval-samples", "2", "--calib-seq-length", "64", "--hf", base / "qhf")
    assert done.returncode == 0, done.stderr[-3000:]
    return base


def _mount_tmpfs(path: pathlib.Path, size_kb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _fill(folder: pathlib.Path) -> None:
    """Take every free byte of the file system under ``folder``."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (4096, 1):
            try:
                while True:
                    os.write(fd, b"\1" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- item 2: rnope-preprocess

def test_preprocess_refuses_to_replace_a_dataset_or_its_input(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5)))
    assert run("rnope-preprocess", "--input", docs, "--output-prefix", tmp_path / "web").returncode == 0
    before = hashes(tmp_path)
    again = run("rnope-preprocess", "--input", docs, "--output-prefix", tmp_path / "web")
    assert_one_line_error(again, "rnope-preprocess", "web.bin exists", "--force")
    # an input named PREFIX.bin is one of the outputs: refused even with --force
    named = tmp_path / "named.bin"
    named.write_text("a text file the user named .bin")
    before_named = hashes(tmp_path)
    clash = run("rnope-preprocess", "--input", named, "--output-prefix", tmp_path / "named", "--force")
    assert_one_line_error(clash, "rnope-preprocess", "would overwrite the input", str(named))
    assert hashes(tmp_path) == before_named and before.items() <= before_named.items()
    replaced = run("rnope-preprocess", "--input", docs, docs, "--output-prefix", tmp_path / "web", "--force")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert "10 documents" in replaced.stdout and not leftovers(tmp_path)


def test_sigterm_during_preprocess_leaves_nothing_and_stale_partials_are_swept(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5)))
    stale = tmp_path / f".web.bin.partial-{DEAD_PID}"  # a kill -9 of an earlier run
    stale.write_bytes(b"\1" * 1000)
    before = hashes(docs)
    stopped = run("rnope-preprocess", "--input", docs, "--output-prefix", tmp_path / "web",
                  env={"RNOPE_FAULT": "term@mid_output:2"})
    assert stopped.returncode == 128 + 15, stopped.stderr[-2000:]
    assert_one_line_error(stopped, "rnope-preprocess", "stopped by SIGTERM", "partial output removed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]
    assert hashes(docs) == before


# ---------------------------------------------------------------- item 10: from-hf

def test_sigterm_during_from_hf_leaves_nothing_and_stale_partials_are_swept(models, tmp_path):
    hf, _ = models
    stale = tmp_path / f".mg.partial-{DEAD_PID}"
    (stale / "iter_0000000").mkdir(parents=True)
    (stale / "iter_0000000" / "__0_0.distcp").write_bytes(b"\1" * 1000)
    before = hashes(hf)
    stopped = run("rnope-convert", "from-hf", hf, tmp_path / "mg", env={"RNOPE_FAULT": "term@mid_output:2"})
    assert stopped.returncode == 128 + 15, stopped.stderr[-2000:]
    assert_one_line_error(stopped, "rnope-convert", "stopped by SIGTERM")
    assert list(tmp_path.iterdir()) == [] and hashes(hf) == before


# ---------------------------------------------------------------- item 3: --force keeps the user's files

def test_force_keeps_a_model_card_the_user_added_to_an_export(models, exported):
    _, mg = models
    out, _ = exported
    (out / "README.md").write_text("# my model card\n")
    manifest = json.loads((out / ".rnope-convert.json").read_text())
    assert "config.json" in manifest["files"] and "README.md" not in manifest["files"]
    before = hashes(mg)
    again = run("rnope-convert", "to-hf", mg, out, "--force")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "README.md").read_text() == "# my model card\n"
    assert "kept README.md" in again.stdout
    assert hashes(mg) == before and not leftovers(out.parent)


def test_quantize_force_keeps_user_files_in_both_outputs(models, quantized):
    _, mg = models
    for folder in ("q", "qhf"):
        (quantized / folder / "README.md").write_text(f"notes on {folder}\n")
    before = hashes(mg)
    again = run("rnope-quantize", mg, quantized / "q", "--format", "fp8", "--calib-samples", "2",
                "--eval-samples", "2", "--calib-seq-length", "64", "--hf", quantized / "qhf", "--force")
    assert again.returncode == 0, again.stderr[-3000:]
    for folder in ("q", "qhf"):
        assert (quantized / folder / "README.md").read_text() == f"notes on {folder}\n"
    assert hashes(mg) == before and not leftovers(quantized)


# ---------------------------------------------------------------- items 4, 5: rnope-eval outputs

def test_eval_on_a_full_disk_keeps_the_previous_json(models, tmp_path):
    _, mg = models
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, 64):
        pytest.skip("cannot mount a small tmpfs here (needs root/CAP_SYS_ADMIN)")
    try:
        ids = tmp_path / "ids.json"
        ids.write_text(json.dumps([[(7 * i) % 320 for i in range(64)]]))
        previous = disk / "loss.json"
        previous.write_text(json.dumps({"loss": 1.0, "note": "an earlier result"}) + "\n")
        _fill(disk)
        before = hashes(previous)
        full = run("rnope-eval", "loss", "--checkpoint", mg, "--input-ids", ids, "--json", previous)
        assert_one_line_error(full, "rnope-eval", "no space left on device", str(previous))
        assert hashes(previous) == before and not leftovers(disk)
        (disk / "filler").unlink()
        # the PNG too: written whole or not at all
        (disk / "big").write_bytes(b"\0" * (60 * 1024))
        _fill(disk)
        png = run("rnope-eval", "loss", "--checkpoint", mg, "--input-ids", ids, "--png", disk / "loss.png")
        assert_one_line_error(png, "rnope-eval", "no space left on device", str(disk / "loss.png"))
        assert sorted(p.name for p in disk.iterdir()) == ["big", "filler", "loss.json"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_eval_output_paths_are_checked_before_evaluating(models, tmp_path):
    _, mg = models
    grid = ["--checkpoint", mg, "--lengths", "128", "--depths", "0,1", "--samples", "2"]
    missing = run("rnope-eval", "passkey", *grid, "--json", "/no/such/dir/out.json")
    assert_one_line_error(missing, "rnope-eval", "--json /no/such/dir/out.json", "does not exist")
    assert "length" not in missing.stderr.splitlines()[0] and "accuracy" not in missing.stderr  # nothing evaluated
    folder = tmp_path / "plots"
    folder.mkdir()
    png_dir = run("rnope-eval", "passkey", *grid, "--png", folder)
    assert_one_line_error(png_dir, "rnope-eval", f"--png {folder} is a directory")
    assert "accuracy" not in png_dir.stderr
    assert list(tmp_path.iterdir()) == [folder] and list(folder.iterdir()) == []


def test_lm_eval_tasks_never_overwrites_files_it_did_not_write(tmp_path):
    out = tmp_path / "tasks"
    out.mkdir()
    mine = out / "rnope_passkey_256.jsonl"  # same name as a file the command writes
    mine.write_text("the user's own cases\n")
    args = ["lm-eval-tasks", "--out", out, "--lengths", "256", "--depths", "0.5", "--samples", "1"]
    for extra in ([], ["--force"]):
        refused = run("rnope-eval", *args, *extra)
        assert_one_line_error(refused, "rnope-eval", str(out), "not empty" if not extra else "was not written by")
        assert mine.read_text() == "the user's own cases\n" and sorted(os.listdir(out)) == [mine.name]
    mine.unlink()
    (out / "README.md").write_text("how I run these\n")
    shutil.rmtree(out)
    assert run("rnope-eval", *args).returncode == 0
    (out / "README.md").write_text("how I run these\n")
    written = hashes(out)
    again = run("rnope-eval", *args, "--seed", "1", "--force")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "README.md").read_text() == "how I run these\n"
    assert hashes(out)[str(mine)] != written[str(mine)]  # its own file replaced
    spec = json.loads((out / "rnope_passkey_256.yaml").read_text())
    assert spec["dataset_kwargs"]["data_files"]["test"] == str(mine.resolve())
    assert not leftovers(tmp_path)


def test_quantize_hf_containing_out_is_refused_before_writing(models, tmp_path):
    pytest.importorskip("modelopt")
    _, mg = models
    before = hashes(mg)
    nested = run("rnope-quantize", mg, tmp_path / "hf" / "q", "--format", "fp8", "--calib-samples", "2",
                 "--eval-samples", "2", "--calib-seq-length", "64", "--hf", tmp_path / "hf")
    assert_one_line_error(nested, "rnope-quantize", "contains OUT_DIR")
    assert list(tmp_path.iterdir()) == [] and hashes(mg) == before


# ---------------------------------------------------------------- items 7, 12: from-hf refuses before building

@pytest.mark.parametrize("field, value, fragment", [
    ("hidden_size", 1_000_000, "hidden_size = 1000000 does not match tensor"),
    ("vocab_size", 2_000_000_000, "vocab_size = 2000000000 does not match tensor"),
    ("intermediate_size", 10_000_000_000, "intermediate_size = 10000000000 does not match tensor"),
    ("num_attention_heads", 7, "num_attention_heads=7 does not divide hidden_size=64"),
])
def test_from_hf_checks_the_config_against_the_weights_before_building(models, tmp_path, field, value, fragment):
    hf, _ = models
    edited = tmp_path / "hf"
    shutil.copytree(hf, edited)
    config = json.loads((edited / "config.json").read_text())
    config[field] = value
    config.pop("head_dim", None)
    (edited / "config.json").write_text(json.dumps(config))
    before = hashes(edited)
    result = run("rnope-convert", "from-hf", edited, tmp_path / "mg", cap_memory=True)
    assert_one_line_error(result, "rnope-convert", "config.json", fragment)
    assert hashes(edited) == before and sorted(os.listdir(tmp_path)) == ["hf"]


# ---------------------------------------------------------------- items 9, 12, 15, 16: quantize sizes

@pytest.mark.parametrize("option, value, fragment", [
    ("--calib-samples", "1000000000", "--calib-samples 1000000000"),
    ("--calib-seq-length", "-5", "--calib-seq-length must be >= 1"),
    ("--calib-seq-length", "0", "--calib-seq-length must be >= 1"),
])
def test_quantize_refuses_nonsense_sizes_up_front_without_warnings(models, tmp_path, option, value, fragment):
    pytest.importorskip("modelopt")
    _, mg = models
    before = hashes(mg)
    args = {"--calib-seq-length": "64", option: value}
    result = run("rnope-quantize", mg, tmp_path / "q", "--format", "fp8", *[x for kv in args.items() for x in kv],
                 cap_memory=True)
    assert_one_line_error(result, "rnope-quantize", fragment)
    assert result.stderr.strip().count("\n") == 0, result.stderr  # no library warnings before it
    assert list(tmp_path.iterdir()) == [] and hashes(mg) == before


# ---------------------------------------------------------------- items 12, 16, 17, 18: to-hf

def test_to_hf_refuses_a_negative_shard_size(models, tmp_path):
    _, mg = models
    result = run("rnope-convert", "to-hf", mg, tmp_path / "out", "--shard-mb", "-1")
    assert_one_line_error(result, "rnope-convert", "--shard-mb must be >= 1")
    assert list(tmp_path.iterdir()) == []


def test_to_hf_of_a_quantized_checkpoint_says_what_to_do(quantized, tmp_path):
    result = run("rnope-convert", "to-hf", quantized / "q", tmp_path / "out")
    assert_one_line_error(result, "rnope-convert", "is a quantized checkpoint (fp8)", "rnope-quantize", "--hf")
    assert list(tmp_path.iterdir()) == []


def test_to_hf_on_a_full_disk_names_the_file(models, tmp_path):
    _, mg = models
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, 128):  # the fp32 weights take ~600 KiB
        pytest.skip("cannot mount a small tmpfs here (needs root/CAP_SYS_ADMIN)")
    try:
        result = run("rnope-convert", "to-hf", mg, disk / "out")
        assert_one_line_error(result, "rnope-convert", "no space left on device",
                              str(disk / "out" / "model-00001.safetensors"))
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_an_fp32_model_imported_and_exported_is_bit_identical_without_flags(models, exported):
    from safetensors.torch import load_file

    hf, _ = models
    out, stdout = exported
    assert "exporting in fp32, the checkpoint's precision" in stdout
    original, again = load_file(hf / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(again) <= set(original) and len(again) >= len(original) - 1  # a tied head may be stored once
    for name, tensor in again.items():
        assert tensor.dtype == original[name].dtype and tensor.equal(original[name]), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
