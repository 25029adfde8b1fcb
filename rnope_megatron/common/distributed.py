"""Process groups for one rank: torch.distributed + Megatron's parallel state.

Works under torchrun (reads RANK/WORLD_SIZE/MASTER_*), and as a plain single process
(creates a one-rank group on a free local port). NCCL on GPU, gloo on CPU, where the CPU
compat layer is switched on (it refuses to activate when CUDA is present)."""

from __future__ import annotations

import os
import socket
import types

import torch
import torch.distributed as dist

from rnope_megatron.compat import cpu as cpu_compat


def free_port() -> int:
    """An unused local TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compute_device() -> torch.device | str:
    """Where this rank computes: its CUDA device, or the CPU."""
    return torch.cuda.current_device() if torch.cuda.is_available() else "cpu"


# TP = PP = CP = 1: the layout of a tool that loads a whole model on one rank.
ONE_RANK = types.SimpleNamespace(tensor=1, pipeline=1, virtual_pipeline=None, context=1)


def ensure_single_process() -> None:
    """A one-rank process group and Megatron state (TP=PP=1, CPU compat on CPU), unless a
    process group exists already (tools that load a model on one rank call this)."""
    if not dist.is_initialized():
        initialize_parallel(ONE_RANK)


def shutdown_parallel() -> None:
    """Tear down Megatron's groups and the default process group, if any. Command-line
    tools call it before exiting: a gloo group left to interpreter shutdown aborts the
    process now and then ("terminate called without an active exception", seen in ~1 of 4
    rnope-eval runs) after its work is done."""
    if not dist.is_initialized():
        return  # nothing to tear down (and no need to import Megatron for it)
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def initialize_parallel(layout, seed: int = 1234, rank: int | None = None,
                        world_size: int | None = None) -> None:
    """Create (or reuse) the default process group and Megatron's model-parallel groups,
    then seed torch and Megatron's RNG tracker. ``rank``/``world_size`` default to the
    torchrun environment, or to a single process. ``layout``: a
    :class:`rnope_megatron.model.config.ParallelLayout` (or anything with its tensor,
    pipeline, virtual_pipeline and context sizes)."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
            # A lone process needs no rendezvous port of anyone else's: a MASTER_PORT
            # inherited from a parent job would collide with the parent's store. Under
            # torchrun (even --nproc-per-node=1) the port is the agent's store, which the
            # worker must join: replacing it leaves the worker waiting 30 min for a server.
            os.environ["MASTER_PORT"] = str(free_port())
        elif "MASTER_PORT" not in os.environ:
            raise RuntimeError("MASTER_PORT is not set: launch multi-process runs with torchrun")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank,
                                world_size=world_size)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        context_parallel_size=layout.context,
    )
    cpu_compat.enable()
    cpu_compat.seed_model_parallel_rng(seed)
