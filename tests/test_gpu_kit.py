"""The GPU check kit's CPU side: ``tools/gpu_check.sh --dry-run`` lists its checks and
validates every recipe they would train (the expected refusal included) without a GPU."""

import pathlib
import random
import subprocess
import sys

import pytest

from tests.trainer import ROOT


def test_dry_run_lists_checks_and_validates_their_recipes():
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for check in ("check_trainer", "check_te_vs_portable", "check_te_trainer", "check_fp8_attention_refusal",
                  "check_backend_per_layer"):
        assert f"  {check}: " in out, check
    assert "  ok  te fp8 linears: recipe ok" in out
    assert ("  ok  te fp8 attention=all (refused on Hopper): refused: train.fp8.attention=all: FP8 attention on "
            "sliding layer 1 (S): no TE backend runs FP8 attention with a sliding window below sm100 (h200 is sm90)"
            in out)
    assert "BAD" not in out


def test_dry_run_fails_when_a_run_does_not_end_as_expected(monkeypatch, capsys):
    """A run expected to validate that is refused (and a refusal that does not come) is BAD."""
    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_check_te

    runs = [("fp8 on portable", ["train.fp8.recipe=delayed"], None),
            ("te bf16 expected refused", gpu_check_te.TE_BF16, "anything")]
    assert gpu_check_te.dry_run(runs) is False
    out = capsys.readouterr().out
    assert "BAD fp8 on portable: refused: train.fp8: FP8 runs through Transformer Engine" in out
    assert "BAD te bf16 expected refused: recipe ok" in out


# ---- carrying Transformer Engine in parts (tools/te_bundle.py), on synthetic files: the
# tests never download anything (only `te_bundle.py prepare` does, and no test calls it).

sys.path.insert(0, str(ROOT / "tools"))
import te_bundle  # noqa: E402


def _fake_wheels(folder: pathlib.Path) -> list[pathlib.Path]:
    rng = random.Random(0)
    sizes = {"transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl": 5 * 1024 * 1024 + 17,
             "megatron_core-0.19.2-py3-none-any.whl": 300_001, "pydantic-2.0-py3-none-any.whl": 1024,
             "transformer_engine_torch-2.20.2.tar.gz": 2 * 1024 * 1024}  # exactly two parts
    folder.mkdir()
    files = []
    for name, size in sizes.items():
        path = folder / name
        path.write_bytes(rng.randbytes(size))
        files.append(path)
    return files


def _bundle(tmp_path):
    files = _fake_wheels(tmp_path / "wheels")
    manifest = te_bundle.split(files, tmp_path / "te", part_mib=1, carry_mib=2.5)
    return files, manifest


def test_split_parts_stay_within_the_limits_and_reassemble_byte_identical(tmp_path):
    files, manifest = _bundle(tmp_path)
    parts = [part for entry in manifest["files"] for part in entry["parts"]]
    assert all(part["size"] <= 1024 * 1024 for part in parts)
    per_call = {}
    for part in parts:
        per_call[part["call"]] = per_call.get(part["call"], 0) + part["size"]
    assert all(size <= 2.5 * 1024 * 1024 for size in per_call.values())
    assert len([p for p in parts if p["name"].startswith("transformer_engine_torch")]) == 2
    # the parts on disk are what the manifest lists, and nothing else
    on_disk = sorted(p.name for p in (tmp_path / "te").glob("call-*/*"))
    assert on_disk == sorted(p["name"] for p in parts)
    rebuilt = te_bundle.verify(tmp_path / "te", tmp_path / "out")
    assert sorted(p.name for p in rebuilt) == sorted(p.name for p in files)
    for original in files:
        assert (tmp_path / "out" / original.name).read_bytes() == original.read_bytes()


@pytest.mark.parametrize("damage", ["missing", "flipped", "truncated"])
def test_a_damaged_part_is_refused_in_one_line_naming_it(tmp_path, damage):
    _bundle(tmp_path)
    part = sorted((tmp_path / "te").glob("call-*/transformer_engine_cu13*.part002"))[0]
    if damage == "missing":
        part.unlink()
    elif damage == "flipped":
        data = bytearray(part.read_bytes())
        data[100] ^= 0xFF
        part.write_bytes(bytes(data))
    else:
        part.write_bytes(part.read_bytes()[:-1])
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "te_bundle.py"), "verify", str(tmp_path / "te")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and part.name in lines[0] and "Traceback" not in result.stderr


def test_the_planned_device_calls_fit_the_budget_and_carry_at_most_64_mib(tmp_path):
    _, manifest = _bundle(tmp_path)
    calls = te_bundle.plan(manifest)
    assert all(call["mib"] <= te_bundle.CARRY_LIMIT_MIB for call in calls)
    assert [c["carry"] for c in calls[:-2]] == sorted({f".whl/te/call-{p['call']:02d}"
                                                      for e in manifest["files"] for p in e["parts"]})
    assert "build" in calls[-2]["what"] and calls[-1]["carry"] == ".gpu_ref"
    assert sum(c["minutes"] for c in calls) <= te_bundle.BUDGET_MINUTES
    # the full-size bundle: 276.5 MB of TE core in 60 MiB parts plus ~60 MB of the rest
    big = {"part_bytes": 60 * te_bundle.MIB, "files": [{"name": "x", "parts": [
        {"call": i + 1, "name": f"x.part{i}", "size": 60 * te_bundle.MIB} for i in range(6)]}]}
    text = te_bundle.render_plan(te_bundle.plan(big))
    assert "fits" in text.splitlines()[-1]


def test_part_size_above_the_carry_limit_is_refused(tmp_path):
    files = _fake_wheels(tmp_path / "wheels")
    with pytest.raises(ValueError, match="--part-mib 65"):
        te_bundle.split(files, tmp_path / "te", part_mib=65)
