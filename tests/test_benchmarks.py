"""benchmarks/attention.py: its JSON contract and its FLOP-ratio formula (checked against
key visits counted from the dense mask). Timings themselves are not asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rnope_megatron.attention.sliding_window import sliding_window_mask

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import attention as attention_benchmark  # noqa: E402


@pytest.mark.parametrize("seq, window", [(16, 4), (100, 7), (64, 64), (33, 1), (10, 50)])
def test_flop_ratio_counts_key_visits_exactly(seq, window):
    visits_global = int(sliding_window_mask(seq, seq).sum())
    visits_swa = int(sliding_window_mask(seq, window).sum())
    assert attention_benchmark.flop_ratio(seq, window) == pytest.approx(visits_global / visits_swa, rel=1e-12)


def test_json_rows_have_the_documented_keys(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/attention.py", "--seq-lens", "128", "256", "--window", "32",
         "--ratio", "8", "--heads", "2", "--head-dim", "16", "--repeats", "1", "--min-time", "0", "--device", "cpu",
         "--json", "--png", str(tmp_path / "plot.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert [(r["sweep"], r["seq_len"], r["window"]) for r in rows] == [
        ("fixed_window", 128, 32), ("fixed_window", 256, 32), ("fixed_ratio", 128, 16), ("fixed_ratio", 256, 32),
    ]
    for row in rows:
        assert set(attention_benchmark.ROW_KEYS) <= set(row)
        assert row["swa_ms"] > 0 and row["global_ms"] > 0 and row["stream_ms"] > 0
        assert row["measured_ratio"] == pytest.approx(row["global_ms"] / row["swa_ms"], rel=0.05)
        assert row["swa_kernel"] == "native"
    assert (tmp_path / "plot.png").stat().st_size > 1000
