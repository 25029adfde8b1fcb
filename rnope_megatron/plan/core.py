"""A recipe's plan: validated layout, layer map, memory per GPU, FLOPs, step time and the
speed-up over the matching all-global RoPE baseline, as one JSON-ready mapping.

Validation is the trainer's own (:func:`rnope_megatron.recipe.validation.validate` with the
planned world size): a layout the planner accepts is one ``rnope-train`` accepts, with
the same messages. FLOPs come from :mod:`rnope_megatron.model.flops`, the model the trainer
logs TFLOP/s and MFU with.
"""

from __future__ import annotations

import dataclasses
import pathlib

from rnope_megatron.common.errors import UserError
from rnope_megatron.common.gpus import GPU, by_name
from rnope_megatron.model.flops import COMPONENTS, forward_flops_breakdown, pack_forward_breakdown
from rnope_megatron.plan.documents import DocumentPacks, document_packs
from rnope_megatron.plan.layers import layer_map
from rnope_megatron.plan.memory import GB, USABLE_FRACTION, Setup, plan_memory
from rnope_megatron.recipe import load_recipe
from rnope_megatron.recipe.validation import data_parallel_size, validate

# Assumed sustained share of the bf16 peak when --achieved-tflops is not given: what
# well-tuned Megatron runs of dense 8B-70B models report on H100 (35-45% MFU).
DEFAULT_ACHIEVED_FRACTION = 0.40

# The key set of the JSON output (pinned by a test: tools parse it).
KEYS = (
    "recipe", "gpu", "nodes", "gpus_per_node", "world_size", "layout", "layer_map",
    "flops_per_token", "attention_flops_per_token", "flops_by_component", "hardware_flops_per_token",
    "memory_per_gpu_gb", "usable_memory_gb", "memory_by_stage", "fits", "overflow",
    "achieved_tflops", "pipeline_bubble", "step_time_s", "tokens_per_s", "mfu",
    "baseline", "predicted_speedup_vs_baseline", "documents",
)


def baseline_model(recipe, path: pathlib.Path | None):
    """The all-global RoPE baseline of ``recipe``'s model and where it came from: the
    sibling ``baseline-<stage>.yaml`` when there is one (the 8B recipes), else the same
    shape with pattern R (every layer global with RoPE)."""
    if path is not None and not path.name.startswith("baseline-"):
        sibling = path.with_name(f"baseline-{path.name}")
        if sibling.is_file():
            return load_recipe(sibling).model, str(sibling)
    if set(recipe.model.layer_pattern.layers) <= {"R"}:
        return recipe.model, "itself (every layer global with RoPE)"
    return dataclasses.replace(recipe.model, pattern="R"), "same shape, pattern R (every layer global with RoPE)"


def forward_flops(model, seq: int, packs: DocumentPacks | None) -> dict[str, float]:
    """Forward FLOPs per token by component: of one ``seq``-token sequence, or with
    document masking the mean over the simulated ``packs`` (attention per document)."""
    if packs is None:
        return forward_flops_breakdown(model, seq)
    mean = dict.fromkeys(COMPONENTS, 0.0)
    for pack, weight in zip(packs.packs, packs.weights):
        for name, value in pack_forward_breakdown(model, pack).items():
            mean[name] += weight * value / sum(pack)
    return mean


def _documents_summary(recipe, packs: DocumentPacks | None) -> dict | None:
    """What the plan assumed about documents (None: no document masking)."""
    if not recipe.data.document_mask:
        return None
    if packs is None:
        return {"source": None, "mean_document_length": None,
                "note": "no document lengths (data.paths' .idx not readable here, data.mean_document_length "
                        "unset): priced as without masking"}
    return {"source": packs.source, "mean_document_length": round(packs.mean_document_length, 1),
            "simulated_sequences": len(packs.packs)}


def hardware_flops_per_token(recipe, forward: dict[str, float] | None = None) -> float:
    """Training FLOPs per token the GPUs execute: model FLOPs (3 x ``forward``, default
    the unmasked sequence's) plus recomputation (full: one more forward; selective: core
    attention's forward again)."""
    parts = forward or forward_flops_breakdown(recipe.model, recipe.train.seq_length)
    extra = {"full": sum(parts.values()),
             "selective": parts["attention_sliding"] + parts["attention_global"]}.get(recipe.train.recompute, 0.0)
    return 3 * sum(parts.values()) + extra


def resolve_cluster(recipe, nodes: int | None, gpus_per_node: int | None, gpu: str | None) -> tuple[int, int, GPU]:
    """Command-line values win over the recipe's ``cluster`` section."""
    c = recipe.cluster
    nodes = nodes if nodes is not None else c.nodes
    if nodes is None:
        raise UserError("cluster.nodes is not set in the recipe: pass --nodes N")
    if nodes < 1:
        raise UserError(f"--nodes {nodes} must be >= 1")
    gpus_per_node = gpus_per_node if gpus_per_node is not None else c.gpus_per_node
    if gpus_per_node < 1:
        raise UserError(f"--gpus-per-node {gpus_per_node} must be >= 1")
    return nodes, gpus_per_node, by_name(gpu) if gpu else by_name(c.gpu, "cluster.gpu")


def make_plan(recipe, path=None, nodes: int | None = None, gpus_per_node: int | None = None,
              gpu: str | None = None, achieved_tflops: float | None = None) -> dict:
    """Validate ``recipe`` for the cluster and price it (see the module docstring)."""
    nodes, gpus_per_node, device = resolve_cluster(recipe, nodes, gpus_per_node, gpu)
    world = nodes * gpus_per_node
    validate(recipe, world_size=world)
    dp = data_parallel_size(recipe, world)
    t, p, model = recipe.train, recipe.parallel, recipe.model
    setup = Setup.of(recipe, dp, on_gpu=True)

    stages = plan_memory(recipe, setup)
    usable = device.memory_gb * USABLE_FRACTION
    worst = max(stages, key=lambda s: s.total)
    fits = worst.total / GB <= usable
    overflow = None
    if not fits:
        component = max(worst.components, key=worst.components.get)
        overflow = {"pipeline_rank": worst.rank, "component": component,
                    "component_gb": round(worst.components[component] / GB, 2),
                    "over_by_gb": round(worst.total / GB - usable, 2)}

    seq = t.seq_length
    packs = document_packs(recipe)
    forward = forward_flops(model, seq, packs)
    flops = 3 * sum(forward.values())
    hardware = hardware_flops_per_token(recipe, forward)
    peak = device.bf16_tflops
    achieved = achieved_tflops if achieved_tflops is not None else DEFAULT_ACHIEVED_FRACTION * peak
    if not achieved > 0:
        raise UserError(f"--achieved-tflops {achieved} must be > 0")
    # no GPU sustains more than its datasheet peak (FP8's where the recipe trains in FP8)
    ceiling, kind = (device.fp8_tflops, "fp8") if t.fp8 is not None else (peak, "bf16")
    if achieved > ceiling:
        raise UserError(f"--achieved-tflops {achieved:g} is above the {device.name}'s dense {kind} peak "
                        f"({ceiling:g} TFLOP/s): give the TFLOP/s one GPU sustains")
    tokens_per_step = t.global_batch_size * seq
    bubble = (p.pipeline - 1) / ((p.virtual_pipeline or 1) * setup.num_microbatches)
    step_time = tokens_per_step * hardware / (world * achieved * 1e12) * (1 + bubble)
    base, base_source = baseline_model(recipe, pathlib.Path(path) if path else None)
    base_flops = 3 * sum(forward_flops(base, seq, packs).values())

    plan = {
        "recipe": str(path) if path else None,
        "gpu": device.name, "nodes": nodes, "gpus_per_node": gpus_per_node, "world_size": world,
        "layout": {"tensor": p.tensor, "pipeline": p.pipeline, "virtual_pipeline": p.virtual_pipeline,
                   "context": p.context, "data": dp, "sequence_parallel": p.sequence_parallel,
                   "context_comm_sliding": setup.comm_sliding if p.context > 1 else None,
                   "context_comm_global": setup.comm_global if p.context > 1 else None,
                   "micro_batch_size": t.micro_batch_size, "global_batch_size": t.global_batch_size,
                   "num_microbatches": setup.num_microbatches, "seq_length": seq, "recompute": t.recompute,
                   "distributed_optimizer": setup.distributed_optimizer, "precision": t.precision,
                   "backend": t.backend},
        "layer_map": layer_map(model, p),
        "flops_per_token": flops,
        "attention_flops_per_token": 3 * (forward["attention_sliding"] + forward["attention_global"]),
        "flops_by_component": {name: 3 * value for name, value in forward.items()},
        "hardware_flops_per_token": hardware,
        "memory_per_gpu_gb": round(worst.total / GB, 3),
        "usable_memory_gb": round(usable, 3),
        "memory_by_stage": [{
            "pipeline_rank": s.rank, "total_gb": round(s.total / GB, 3),
            "components_gb": {k: round(v / GB, 3) for k, v in s.components.items()},
            "optimizer_without_distributed_optimizer_gb": round(s.optimizer_not_distributed / GB, 3),
            "in_flight_layers": s.in_flight_layers,
            "activations_per_layer_gb": {kind: {k: round(v / GB, 4) for k, v in parts.items()}
                                         for kind, parts in s.activations_by_kind.items()},
        } for s in stages],
        "fits": fits,
        "overflow": overflow,
        "achieved_tflops": achieved,
        "pipeline_bubble": bubble,
        "step_time_s": step_time,
        "tokens_per_s": tokens_per_step / step_time,
        "mfu": tokens_per_step * flops / step_time / (world * peak * 1e12),
        "baseline": {"source": base_source, "flops_per_token": base_flops},
        "predicted_speedup_vs_baseline": base_flops / flops,
        "documents": _documents_summary(recipe, packs),
    }
    assert tuple(plan) == KEYS
    return plan
