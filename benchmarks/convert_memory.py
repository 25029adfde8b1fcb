"""Peak memory of ``rnope-convert to-hf`` (streaming) on a ~1 GB random model.

Builds a random SmolLM3-shaped model (about 1.1 GB in fp32), imports it with
``from-hf``, then exports it with ``to-hf --shard-mb N`` while sampling the exporter's RSS.
The same export of a tiny checkpoint gives the fixed cost (interpreter, torch, Megatron,
meta-device model). Prints one table; ``--json`` prints the row.

    python benchmarks/convert_memory.py [--shard-mb 100] [--work-dir /tmp/convert-mem]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def build_hf(path: pathlib.Path, hidden: int, layers: int, ffn: int, vocab: int) -> int:
    import torch
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    config = SmolLM3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                           num_attention_heads=16, num_key_value_heads=4, use_sliding_window=True,
                           sliding_window=512, layer_types=["sliding_attention", "sliding_attention",
                                                            "sliding_attention", "full_attention"] * (layers // 4),
                           no_rope_layers=[1, 1, 1, 0] * (layers // 4), max_position_embeddings=4096,
                           pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = SmolLM3ForCausalLM(config)
    model.save_pretrained(path, max_shard_size="200MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB over the process tree, seconds)."""
    import psutil

    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed with {proc.returncode}")
    return peak / 2**20, time.time() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard-mb", type=int, default=100)
    parser.add_argument("--work-dir", default="/tmp/rnope-convert-mem")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    work = pathlib.Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    py = sys.executable
    convert = [py, "-m", "rnope_megatron.convert"]
    model_bytes = build_hf(work / "hf", hidden=1024, layers=16, ffn=4096, vocab=32768)
    build_hf(work / "hf-tiny", hidden=64, layers=4, ffn=128, vocab=512)
    for name in ("hf", "hf-tiny"):
        subprocess.run(convert + ["from-hf", str(work / name), str(work / f"mg-{name}")], check=True, cwd=ROOT,
                       capture_output=True)
    base, _ = peak_rss_of(convert + ["to-hf", str(work / "mg-hf-tiny"), str(work / "out-tiny"), "--dtype", "fp32"])
    peak, seconds = peak_rss_of(convert + ["to-hf", str(work / "mg-hf"), str(work / "out"), "--dtype", "fp32",
                                           "--shard-mb", str(args.shard_mb)])
    shards = sorted((work / "out").glob("*.safetensors"))
    largest_shard = max(p.stat().st_size for p in shards) / 2**20
    row = {"model_mb": round(model_bytes / 2**20, 1), "shards": len(shards), "largest_shard_mb": round(largest_shard, 1),
           "fixed_cost_mb": round(base, 1), "peak_rss_mb": round(peak, 1),
           "peak_minus_fixed_mb": round(peak - base, 1), "seconds": round(seconds, 1)}
    if args.json:
        print(json.dumps(row))
    else:
        print("to-hf streaming export, fp32, --shard-mb", args.shard_mb)
        for key, value in row.items():
            print(f"  {key:<22}{value}")
    shutil.rmtree(work, ignore_errors=True)
    return row


if __name__ == "__main__":
    main()
