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


def test_train_step_benchmark_json_and_flop_prediction(tmp_path):
    """benchmarks/train_step.py at tiny sizes: one row per (L/W, L) plus the HF row, the
    documented keys, and the predicted speed-up equal to flops.py's ratio of the two
    models (recomputed here from the FLOP model's per-layer terms)."""
    import train_step

    proc = subprocess.run(
        [sys.executable, "benchmarks/train_step.py", "--seq-lens", "256", "--ratios", "8", "--hf-lengths", "256",
         "--layers", "4", "--hidden", "64", "--heads", "2", "--kv-heads", "2", "--vocab", "128", "--repeats", "1",
         "--json", "--png", str(tmp_path / "step.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert [(r["kind"], r["seq_len"], r["window"]) for r in rows] == [("vs RoPE baseline", 256, 32),
                                                                        ("vs HF SmolLM3", 256, 32)]
    for row in rows:
        assert set(train_step.ROW_KEYS) <= set(row)
        assert row["rnope_ms"] > 0 and row["other_ms"] > 0
    # per layer: linear terms cancel only in the difference; 3 S layers at span(W), 1 G at (L+1)/2
    h, q, ffn, vocab, seq, w = 64, 64, 192, 128, 256, 32
    linear = 2 * (h * (q + 2 * q) + q * h + 3 * h * ffn)
    span_w = (w * seq - w * (w - 1) / 2) / seq
    rope = 4 * (linear + 4 * q * (seq + 1) / 2) + 2 * h * vocab
    rnope = 3 * (linear + 4 * q * span_w) + linear + 4 * q * (seq + 1) / 2 + 2 * h * vocab
    assert rows[0]["flop_speedup"] == pytest.approx(rope / rnope, abs=1e-3)
    assert (tmp_path / "step.png").read_bytes()[:4] == b"\x89PNG"
