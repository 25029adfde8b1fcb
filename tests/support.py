"""Shared test helpers: process groups, a tiny config, multi-process runs under gloo, and
the dense float64 attention every kernel is checked against."""

from __future__ import annotations

import math
import multiprocessing.connection as mp_connection
import os
import pickle
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rnope_megatron.common.distributed import free_port, initialize_parallel, shutdown_parallel  # noqa: F401  (re-exported)
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


def _serve(rank, world_size, conn):
    """A pooled rank: run each task the test process sends (its ``sys.path`` first, so a
    worker from a folder a test added, e.g. benchmarks/, unpickles) on a process group
    made for that task and torn down after it (Megatron makes some twenty groups per
    layout, each with gloo threads that poll: kept, they add up to hundreds of busy
    threads). Exit on ``None``, on a failed task and when the test process is gone (its
    end of the pipe closes)."""
    torch.set_num_threads(1)
    try:
        while (message := conn.recv()) is not None:
            sys.path[:], task = message
            worker, args, port, out_dir = pickle.loads(task)
            try:
                torch.save(worker(rank, world_size, port, *args), os.path.join(out_dir, f"rank{rank}.pt"))
                dist.barrier()
                shutdown_parallel()
            except BaseException:
                conn.send(traceback.format_exc())
                return
            conn.send(None)
    except EOFError:
        return
    finally:
        shutdown_parallel()


class RankPool:
    """``world_size`` spawned processes kept by this test process for its session: every
    multi-process test of that size runs its worker on them instead of spawning fresh ranks (each spawn imports torch and Megatron: seconds of CPU). Every
    worker starts with ``init_megatron``: a task gets new process groups (on a new port),
    Megatron's parallel state and RNG states, as fresh ranks would. A failed or stuck task
    ends the pool (the next call starts another)."""

    def __init__(self, world_size: int):
        context = mp.get_context("spawn")
        self.world_size = world_size
        self.connections, self.processes = [], []
        for rank in range(world_size):
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(rank, world_size, theirs), daemon=True)
            process.start()
            theirs.close()
            self.connections.append(ours)
            self.processes.append(process)

    def run(self, worker, args, out_dir: str, timeout: float) -> None:
        task = pickle.dumps((worker, args, free_port(), out_dir))
        for connection in self.connections:
            connection.send((list(sys.path), task))
        waiting, deadline = set(self.connections), time.monotonic() + timeout
        while waiting:
            ready = mp_connection.wait([*waiting, *(p.sentinel for p in self.processes)],
                                       timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self.close()
                raise TimeoutError(f"{worker.__name__} on {self.world_size} pooled ranks: no result in {timeout} s")
            for connection in waiting & set(ready):
                if (failure := connection.recv()) is not None:
                    self.close()
                    raise AssertionError(f"{worker.__name__} failed on a pooled rank:\n{failure}")
                waiting.discard(connection)
            if waiting and any(not p.is_alive() for p in self.processes):
                self.close()
                raise AssertionError(f"a pooled rank running {worker.__name__} died")

    def close(self) -> None:
        for connection in self.connections:
            try:
                connection.send(None)
            except OSError:
                pass  # that rank is gone already
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        _POOLS.pop(self.world_size, None)


_POOLS: dict[int, RankPool] = {}


def close_rank_pools() -> int:
    """End every pool (the session's end: no process is left behind); returns how many."""
    pools = list(_POOLS.values())
    for pool in pools:
        pool.close()
    return len(pools)


def run_distributed(worker, world_size: int, *args, fresh: bool = False, timeout: float = 600) -> list:
    """Run ``worker(rank, world_size, port, *args)`` on ``world_size`` processes under gloo
    and return each rank's return value: the session's :class:`RankPool` of that size, or
    with ``fresh`` newly spawned processes that end with the call (for a worker that
    changes process-wide state, e.g. patches a module)."""
    with tempfile.TemporaryDirectory() as out_dir:
        if fresh:
            mp.spawn(_entry, args=(world_size, free_port(), out_dir, worker, args), nprocs=world_size, join=True)
        else:
            pool = _POOLS.get(world_size)
            if pool is None:
                pool = _POOLS[world_size] = RankPool(world_size)
            pool.run(worker, args, out_dir, timeout)
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
