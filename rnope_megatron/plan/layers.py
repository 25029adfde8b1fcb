"""Which layers each pipeline rank holds, per virtual pipeline chunk.

Megatron decides it (``get_transformer_layer_offset`` and ``get_num_layers_to_build``,
through :func:`rnope_megatron.model.specs.stage_layer_numbers`, the function the model's specs
are built with), so the plan cannot drift from what a run builds; they need no process
group when the rank is given. Layer kinds come from :mod:`rnope_megatron.model.pattern`.
"""

from __future__ import annotations

from rnope_megatron.model.config import ParallelLayout
from rnope_megatron.model.specs import stage_layer_numbers


def chunk_layers(model, pipeline: int, virtual: int | None, rank: int, chunk: int) -> list[int]:
    """Megatron's global 1-based layer numbers of ``chunk`` on pipeline ``rank``."""
    # Tensor/context sizes do not move layers: a config with only the pipeline layout.
    config = model.to_transformer_config(ParallelLayout(pipeline=pipeline, virtual_pipeline=virtual))
    return stage_layer_numbers(config, chunk if virtual else None, rank)


def stage_layers(model, parallel, rank: int) -> list[int]:
    """Every layer number pipeline ``rank`` holds, over its chunks."""
    return [n for chunk in range(parallel.virtual_pipeline or 1)
            for n in chunk_layers(model, parallel.pipeline, parallel.virtual_pipeline, rank, chunk)]


def layer_map(model, parallel) -> list[dict]:
    """One entry per pipeline rank: its chunks, each with its layers' kinds.

    A layer is ``{"layer": n, "kind": "S"|"G"|"R", "attention": "window W"|"global",
    "rope": bool}``; rank 0 also holds the embedding, the last rank the output layer."""
    pattern = model.layer_pattern
    stages = []
    for rank in range(parallel.pipeline):
        chunks = []
        for chunk in range(parallel.virtual_pipeline or 1):
            layers = []
            for number in chunk_layers(model, parallel.pipeline, parallel.virtual_pipeline, rank, chunk):
                kind = pattern.kind(number)
                layers.append({"layer": number, "kind": kind.letter,
                               "attention": f"window {model.window}" if kind.sliding else "global",
                               "rope": kind.rope})
            chunks.append({"chunk": chunk, "layers": layers})
        extras = (["embedding"] if rank == 0 else []) + (["output layer"] if rank == parallel.pipeline - 1 else [])
        stages.append({"pipeline_rank": rank, "holds": extras, "chunks": chunks})
    return stages
