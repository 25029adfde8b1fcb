"""The plan as text for a terminal (``--json`` prints the mapping itself)."""

from __future__ import annotations

from rnope_megatron.model.flops import COMPONENTS


def _layers(chunk: dict) -> str:
    first, last = chunk["layers"][0]["layer"], chunk["layers"][-1]["layer"]
    kinds = "".join(layer["kind"] for layer in chunk["layers"])
    return f"layers {first}-{last} {kinds}"


def render(plan: dict) -> str:
    """A human-readable report of :func:`rnope_megatron.plan.core.make_plan`'s result."""
    lay = plan["layout"]
    lines = [
        f"recipe     {plan['recipe']}",
        f"cluster    {plan['nodes']} nodes x {plan['gpus_per_node']} {plan['gpu']} = {plan['world_size']} GPUs",
        f"layout     TP {lay['tensor']} x PP {lay['pipeline']}"
        + (f" (VPP {lay['virtual_pipeline']})" if lay["virtual_pipeline"] else "")
        + f" x CP {lay['context']} x DP {lay['data']}; SP {'on' if lay['sequence_parallel'] else 'off'}; "
        f"micro-batch {lay['micro_batch_size']}, global batch {lay['global_batch_size']} "
        f"({lay['num_microbatches']} micro-batches/step), seq {lay['seq_length']}",
        f"           {lay['precision']}, backend {lay['backend']}, recompute {lay['recompute'] or 'none'}, "
        f"distributed optimizer {'on' if lay['distributed_optimizer'] else 'off'}"
        + (f", CP sliding {lay['context_comm_sliding']} / global {lay['context_comm_global']}"
           if lay["context"] > 1 else ""),
        "",
        "layer map (S = window + RoPE, G = global NoPE, R = global RoPE)",
    ]
    for stage in plan["layer_map"]:
        chunks = "; ".join(f"chunk {c['chunk']}: {_layers(c)}" for c in stage["chunks"])
        holds = f" + {', '.join(stage['holds'])}" if stage["holds"] else ""
        lines.append(f"  pipeline rank {stage['pipeline_rank']}: {chunks}{holds}")
    lines += ["", f"memory per GPU (GB; usable {plan['usable_memory_gb']:.1f} of the {plan['gpu']})"]
    for stage in plan["memory_by_stage"]:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in stage["components_gb"].items() if v)
        lines.append(f"  rank {stage['pipeline_rank']}: {stage['total_gb']:.2f} = {parts}")
        lines.append(f"          optimizer without the distributed optimizer: "
                     f"{stage['optimizer_without_distributed_optimizer_gb']:.2f}; "
                     f"{stage['in_flight_layers']:g} layer-micro-batches in flight")
        for kind, parts in stage["activations_per_layer_gb"].items():
            detail = ", ".join(f"{k} {v * 1e3:.0f} MB" for k, v in parts.items() if v)
            lines.append(f"          one {kind} layer, one micro-batch: {detail}")
    if plan["fits"]:
        lines.append(f"  fits: yes ({plan['memory_per_gpu_gb']:.1f} GB peak)")
    else:
        o = plan["overflow"]
        lines.append(f"  fits: NO: pipeline rank {o['pipeline_rank']} is {o['over_by_gb']:.1f} GB over; largest "
                     f"component {o['component']} ({o['component_gb']:.1f} GB)")
    total = plan["flops_per_token"]
    lines += ["", f"FLOPs per token (training, window exact): {total / 1e9:.2f} GFLOP"]
    documents = plan["documents"]
    if documents and documents["source"]:
        lines.append(f"  document masking: attention per document, mean {documents['mean_document_length']:,.0f} "
                     f"tokens (lengths from {documents['source']}; {documents['simulated_sequences']} packed sequences simulated)")
    elif documents:
        lines.append(f"  document masking: {documents['note']}")
    for name in COMPONENTS:
        value = plan["flops_by_component"][name]
        lines.append(f"  {name:<18s} {value / 1e9:9.2f} GFLOP  {value / total:6.1%}")
    lines += [
        f"  with recomputation {plan['hardware_flops_per_token'] / 1e9:.2f} GFLOP executed",
        "",
        f"at {plan['achieved_tflops']:.0f} TFLOP/s per GPU achieved (--achieved-tflops): step "
        f"{plan['step_time_s']:.2f} s (pipeline bubble {plan['pipeline_bubble']:.1%}), "
        f"{plan['tokens_per_s']:,.0f} tokens/s, MFU {plan['mfu']:.1%}",
        f"predicted speed-up over the all-global RoPE baseline ({plan['baseline']['source']}): "
        f"x{plan['predicted_speedup_vs_baseline']:.2f} (FLOP bound)",
    ]
    return "\n".join(lines)
