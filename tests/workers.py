"""Per-rank bodies of the multi-process tests (importable by spawned processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from rnope_megatron.model.build import build_model
from rnope_megatron.model.config import ParallelLayout
from rnope_megatron.model.layout_invariant_init import fill_from_global, local_shards, seeded_full_tensor
from tests.support import init_megatron, tiny_config


def global_grads(model) -> dict:
    """{key: [(global slice, grad values)]} of this rank's shards (grads swapped into the
    parameters, then read through Megatron's sharded view)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    grads: dict = {}
    for shard in local_shards(model):
        grads.setdefault(shard.key, []).append(
            (shard.global_slice(), shard.data.clone(), tuple(shard.global_shape))
        )
    return grads


def _on_this_cp_rank(tensor, cp_group):
    """Megatron's own split of a [batch, seq] tensor for this context-parallel rank."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    return get_batch_on_this_cp_rank({"x": tensor}, False, cp_group)["x"]


def _whole_sequence(local, cp_group):
    """Inverse of the CP split for [batch, local seq, ...]: gather and restore token order."""
    size = dist.get_world_size(cp_group)
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=cp_group)
    half = local.shape[1] // 2
    chunks = [None] * (2 * size)
    for r, part in enumerate(parts):
        chunks[r], chunks[2 * size - 1 - r] = part[:, :half], part[:, half:]
    return torch.cat(chunks, dim=1)


def forward_backward(rank, world_size, port, layout_kwargs, model_kwargs, ids, documents=None):
    """Loss, full-vocab logits and global gradients for one batch, under ``layout``.

    Pipeline stages hand activations over with plain send/recv (the real pipeline
    schedule is the trainer's business); tied embedding grads (over Megatron's embedding
    group) and sequence-parallel norm grads (over TP) are all-reduced as
    finalize_model_grads does. Under context parallelism each rank takes its chunks with
    Megatron's get_batch_on_this_cp_rank, its loss is its tokens' share of the mean, and
    the replicated weights' gradients are summed over the CP group (as Megatron's DDP does
    over data x context parallel ranks). ``documents``: one ``cu_seqlens`` per row of
    ``ids`` (document masking, through ``run_model``)."""
    from megatron.core import parallel_state, tensor_parallel

    layout = ParallelLayout(**layout_kwargs)
    init_megatron(rank, world_size, port, layout)
    cfg = tiny_config(**model_kwargs)
    tc = cfg.to_transformer_config(layout)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    first, last = pp_rank == 0, pp_rank == layout.pipeline - 1
    model = build_model(cfg, tc, pre_process=first, post_process=last)
    fill_from_global(model, seeded_full_tensor(seed=7))

    total_tokens = ids.numel()
    labels = torch.roll(ids, -1, 1)
    cp_group = parallel_state.get_context_parallel_group() if layout.context > 1 else None
    if cp_group is not None:
        ids, labels = _on_this_cp_rank(ids, cp_group), _on_this_cp_rank(labels, cp_group)
    batch, seq = ids.shape
    pos = torch.arange(seq).expand(batch, -1)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    ranks = dist.get_process_group_ranks(pp_group)
    hidden = torch.empty(seq, batch, cfg.hidden_size, requires_grad=True)
    if not first:
        dist.recv(hidden.data, src=ranks[pp_rank - 1], group=pp_group)
        model.set_input_tensor(hidden)
    result = {}
    if documents is not None:
        model = _with_documents(model, documents)
    if last:
        losses = model(ids, pos, None, labels=labels)
        loss = losses.sum() / total_tokens  # this rank's share of the mean over all tokens
        loss.backward()
        with torch.no_grad():
            logits = model(ids, pos, None)
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            total = loss.detach().clone()
            if cp_group is not None:
                logits = _whole_sequence(logits, cp_group)
                dist.all_reduce(total, group=cp_group)
            result["logits"] = logits
        result["loss"] = total
    else:
        out = model(ids, pos, None)
        dist.send(out.detach(), dst=ranks[pp_rank + 1], group=pp_group)
        grad = torch.empty_like(out)
        dist.recv(grad, src=ranks[pp_rank + 1], group=pp_group)
        out.backward(grad)
    if not first:
        dist.send(hidden.grad, dst=ranks[pp_rank - 1], group=pp_group)
    if layout.sequence_parallel:  # as finalize_model_grads: norms saw 1/TP of the tokens
        for param in model.parameters():
            if getattr(param, "sequence_parallel", False):
                dist.all_reduce(param.grad, group=parallel_state.get_tensor_model_parallel_group())
    if cfg.tie_embeddings and layout.pipeline > 1 and (first or last):
        shared = model.shared_embedding_or_output_weight()
        dist.all_reduce(shared.grad, group=parallel_state.get_embedding_group())
    if cp_group is not None:  # weights are replicated over CP: their gradients add up
        for param in model.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad, group=cp_group)
    result["grads"] = global_grads(getattr(model, "unwrapped", model))
    return result


def _with_documents(model, documents):
    """``model(ids, pos, mask, labels=...)`` as :func:`run_model` with ``documents``."""
    from rnope_megatron.model.build import run_model

    def call(ids, pos, mask, labels=None):
        return run_model(model, ids, labels, documents=documents)

    call.parameters, call.named_parameters = model.parameters, model.named_parameters
    call.unwrapped = model
    return call


def context_parallel_traffic(rank, world_size, port, seq, window, heads, dim, letter, documents=None):
    """Bytes this rank sends (point-to-point and all-gather contributions) for one
    sliding (``letter`` S) or global (G) layer's attention, forward + backward, at CP =
    world_size; and the output/gradients gathered back to token order, for comparison
    with one process."""
    from rnope_megatron.attention import context_parallel

    layout = ParallelLayout(context=world_size)
    init_megatron(rank, world_size, port, layout)
    from megatron.core import parallel_state

    group = parallel_state.get_context_parallel_group()
    sent = {"p2p": 0, "all_gather": 0, "reduce": 0}
    real_batch, real_gather, real_reduce = dist.batch_isend_irecv, dist.all_gather, dist.reduce

    def counting_batch(ops):
        sent["p2p"] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        return real_batch(ops)

    def counting_gather(outputs, tensor, *args, **kwargs):
        sent["all_gather"] += tensor.numel() * tensor.element_size()
        return real_gather(outputs, tensor, *args, **kwargs)

    real_broadcast = dist.broadcast

    def counting_broadcast(tensor, src, *args, **kwargs):  # gloo's gather: each rank broadcasts its rows
        if src == dist.get_rank():
            sent["all_gather"] += tensor.numel() * tensor.element_size()
        return real_broadcast(tensor, src, *args, **kwargs)

    def counting_reduce(tensor, dst, *args, **kwargs):
        if dst != dist.get_rank():  # what a non-root rank sends toward the root
            sent["reduce"] += tensor.numel() * tensor.element_size()
        return real_reduce(tensor, dst, *args, **kwargs)

    dist.batch_isend_irecv, dist.all_gather, dist.reduce = counting_batch, counting_gather, counting_reduce
    dist.broadcast = counting_broadcast
    try:
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(seq, 1, heads, dim, generator=g, dtype=torch.float64) for _ in range(3))
        grad_out = torch.randn(seq, 1, heads, dim, generator=g, dtype=torch.float64)
        local = [_on_this_cp_rank(x.transpose(0, 1), group).transpose(0, 1).clone().requires_grad_()
                 for x in (q, k, v)]
        out = context_parallel.context_parallel_attention(*local, window if letter == "S" else None, 0.25, group,
                                                          documents=documents)
        out.backward(_on_this_cp_rank(grad_out.transpose(0, 1), group).transpose(0, 1))
    finally:
        dist.batch_isend_irecv, dist.all_gather, dist.reduce = real_batch, real_gather, real_reduce
        dist.broadcast = real_broadcast
    whole = [_whole_sequence(x.transpose(0, 1), group) for x in (out.detach(), *(t.grad for t in local))]
    return {"sent": sent, "out": whole[0], "grads": whole[1:]}


def built_layers(rank, world_size, port, layout_kwargs, model_kwargs):
    """(vp_stage, layer_number, window, has_rope) of every layer this rank builds."""
    from megatron.core import parallel_state

    layout = ParallelLayout(**layout_kwargs)
    init_megatron(rank, world_size, port, layout)
    cfg = tiny_config(**model_kwargs)
    tc = cfg.to_transformer_config(layout)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    rows = []
    for vp in range(layout.virtual_pipeline or 1):
        vp_stage = vp if layout.virtual_pipeline else None
        chunk = build_model(
            cfg, tc, vp_stage=vp_stage,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        )
        for layer in chunk.decoder.layers:
            attn = layer.self_attention
            rows.append((vp, layer.layer_number, attn.core_attention.window, attn.rotary is not None))
    return {"pp_rank": pp_rank, "layers": rows}


def save_failing_on_rank0(rank, world_size, port, directory):
    """Two ranks save a checkpoint whose manifest cannot be written on rank 0 (a disk that
    filled after the shards): every rank must get the same one-line error, none may hang."""
    import errno

    from rnope_megatron.checkpoint import layout

    init_megatron(rank, world_size, port, ParallelLayout())
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    tensor = torch.arange(8.0) + rank
    state = {"w": ShardedTensor.from_rank_offsets("w", tensor, (0, rank, world_size), replica_id=0)}
    layout.save_state(state, directory, 1, keep=2)  # a first, good checkpoint

    def full_disk(path, iteration):
        raise OSError(errno.ENOSPC, "No space left on device", str(path / layout.MANIFEST))

    layout._write_manifest = full_disk
    try:
        layout.save_state(state, directory, 2, keep=2)
    except layout.CheckpointError as err:
        return str(err)
    return None


def global_paths(rank, world_size, port, seq, heads, groups, dim):
    """A global layer under CP both ways on this rank's chunks: the CPU blockwise path
    and the gathered-sequence path other devices take (run here on CPU); outputs and
    gradients of q, k, v for one random output gradient, each path's in turn."""
    from rnope_megatron.attention import context_parallel as cp

    init_megatron(rank, world_size, port, ParallelLayout(context=world_size))
    from megatron.core import parallel_state

    group = parallel_state.get_context_parallel_group()
    zz = cp.zigzag_of(group, seq // world_size)
    g = torch.Generator().manual_seed(5)
    full = [torch.randn(seq, 1, h, dim, generator=g, dtype=torch.float64) for h in (heads, groups, groups, heads)]
    local = [x[zz.local_positions()] for x in full]
    results = []
    for path in (lambda q, k, v: cp.global_context_attention(q, k, v, 0.3, group),
                 lambda q, k, v: cp.sequence_causal_attention(q, k, v, zz, 0.3, group)):
        inputs = [x.clone().requires_grad_() for x in local[:3]]
        out = path(*inputs)
        results.append([out.detach(), *torch.autograd.grad(out, inputs, local[3])])
    return results


def fails_on_rank_1(rank, world_size, port):
    """Rank 1 raises after the group is up (tests the rank pool's failure path)."""
    init_megatron(rank, world_size, port, ParallelLayout())
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    return rank
