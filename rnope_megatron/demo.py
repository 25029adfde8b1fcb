"""``make demo``: build a tiny RNoPE-SWA model on CPU, show its layer map, train a few steps.

The text is real and needs no download: the Python standard library's own sources, read
as bytes (vocabulary 256). The model is Megatron's GPTModel with our per-layer specs,
running on the portable backend under a one-process gloo group.
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch

from rnope_megatron.config import ParallelLayout, RNoPEConfig
from rnope_megatron.distributed import initialize_parallel
from rnope_megatron.model import build_model


def stdlib_bytes(min_bytes: int = 400_000) -> torch.Tensor:
    """Bytes of a few standard-library modules (present on every Python install)."""
    import argparse as m1
    import dataclasses as m2
    import inspect as m3
    import json.decoder as m4
    import pathlib as m5
    import textwrap as m6

    text = "".join(inspect.getsource(m) for m in (m1, m2, m3, m4, m5, m6))
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    return data if data.numel() >= min_bytes else data.repeat(min_bytes // data.numel() + 1)


def batches(data: torch.Tensor, batch: int, seq: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=generator)
        window = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    model_cfg = RNoPEConfig(
        num_layers=8, hidden_size=128, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=384, vocab_size=256, max_seq_length=args.seq_length, window=64,
        pattern="SSSG",
    )
    initialize_parallel(ParallelLayout(), seed=args.seed)
    model = build_model(model_cfg, model_cfg.to_transformer_config())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"RNoPE-SWA demo: {n_params / 1e6:.2f}M parameters, portable backend, "
          f"{'CUDA' if torch.cuda.is_available() else 'CPU'}")
    print(f"pattern {model_cfg.pattern!r} x {model_cfg.num_layers // len(model_cfg.pattern)}, "
          f"window {model_cfg.window}, RoPE theta {model_cfg.rope_theta:g}")
    print(model_cfg.layer_pattern.describe())

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    data = batches(stdlib_bytes(), args.batch_size, args.seq_length, args.seed)
    positions = torch.arange(args.seq_length).expand(args.batch_size, -1)
    tokens_per_step = args.batch_size * args.seq_length
    first = last = None
    start = time.time()
    for step in range(1, args.steps + 1):
        inputs, labels = next(data)
        loss = model(inputs, positions, None, labels=labels).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if step == 1 or step % 5 == 0 or step == args.steps:
            elapsed = time.time() - start
            eta = elapsed / step * (args.steps - step)
            print(f"step {step:4d}/{args.steps}  loss {last:.4f}  "
                  f"{tokens_per_step * step / elapsed:,.0f} tok/s  elapsed {elapsed:.0f}s  eta {eta:.0f}s",
                  flush=True)
    print(f"loss {first:.3f} -> {last:.3f} (uniform over 256 bytes would be {torch.log(torch.tensor(256.)):.3f})")


if __name__ == "__main__":
    main()
