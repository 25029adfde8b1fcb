"""The GPU check kit's CPU side: ``tools/gpu_check.sh --dry-run`` lists its checks and
validates every recipe they would train (the expected refusal included) without a GPU."""

import subprocess
import sys

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
