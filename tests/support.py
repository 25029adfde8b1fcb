"""Shared test helpers: process groups, a tiny config, multi-process runs under gloo, and
the dense float64 attention every kernel is checked against."""

from __future__ import annotations

import math
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rnope_megatron.common.distributed import free_port, initialize_parallel  # noqa: F401  (re-exported for tests)
from rnope_megatron.model.config import ParallelLayout, RNoPEConfig


def init_megatron(rank: int, world_size: int, port: int, layout: ParallelLayout, seed: int = 1234):
    """gloo process group + Megatron parallel state + CPU compat + RNG, for one rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    initialize_parallel(layout, seed, rank=rank, world_size=world_size)


def tiny_config(**overrides) -> RNoPEConfig:
    values = dict(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=96, vocab_size=96, max_seq_length=64, window=8, pattern="SSSG",
    )
    values.update(overrides)
    return RNoPEConfig(**values)


def _entry(rank, world_size, port, out_dir, worker, args):
    torch.set_num_threads(1)
    result = worker(rank, world_size, port, *args)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_distributed(worker, world_size: int, *args) -> list:
    """Run ``worker(rank, world_size, port, *args)`` in ``world_size`` fresh processes
    (spawned, gloo) and return each rank's return value."""
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world_size, port, out_dir, worker, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def dense_attention(q, k, v, window=None, scale=None):
    """The oracle: softmax over an explicit [L, L] causal (or HF sliding-window) mask, in
    float64, GQA by repeating K/V. q: [B, Hq, L, D]; k, v: [B, Hkv, L, D]."""
    from rnope_megatron.attention.sliding_window import sliding_window_mask

    q, k, v = (x.double() for x in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    seq = q.shape[2]
    mask = sliding_window_mask(seq, window or seq)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v
