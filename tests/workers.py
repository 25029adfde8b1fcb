"""Per-rank bodies of the multi-process tests (importable by spawned processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from rnope_megatron.config import ParallelLayout
from rnope_megatron.model import build_model
from rnope_megatron.layout_invariant_init import fill_from_global, local_shards, seeded_full_tensor
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


def forward_backward(rank, world_size, port, layout_kwargs, model_kwargs, ids):
    """Loss, full-vocab logits and global gradients for one batch, under ``layout``.

    Pipeline stages hand activations over with plain send/recv (the real pipeline
    schedule is the trainer's business); tied embedding grads (over Megatron's embedding
    group) and sequence-parallel norm grads (over TP) are all-reduced as
    finalize_model_grads does."""
    from megatron.core import parallel_state, tensor_parallel

    layout = ParallelLayout(**layout_kwargs)
    init_megatron(rank, world_size, port, layout)
    cfg = tiny_config(**model_kwargs)
    tc = cfg.to_transformer_config(layout)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    first, last = pp_rank == 0, pp_rank == layout.pipeline - 1
    model = build_model(cfg, tc, pre_process=first, post_process=last)
    fill_from_global(model, seeded_full_tensor(seed=7))

    batch, seq = ids.shape
    pos = torch.arange(seq).expand(batch, -1)
    labels = torch.roll(ids, -1, 1)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    ranks = dist.get_process_group_ranks(pp_group)
    hidden = torch.empty(seq, batch, cfg.hidden_size, requires_grad=True)
    if not first:
        dist.recv(hidden.data, src=ranks[pp_rank - 1], group=pp_group)
        model.set_input_tensor(hidden)
    result = {}
    if last:
        losses = model(ids, pos, None, labels=labels)
        loss = losses.mean()
        loss.backward()
        with torch.no_grad():
            logits = model(ids, pos, None)
            result["logits"] = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        result["loss"] = loss.detach()
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
    result["grads"] = global_grads(model)
    return result


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
