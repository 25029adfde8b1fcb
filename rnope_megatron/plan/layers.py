"""Which layers each pipeline rank holds, per virtual pipeline chunk.

The assignment is Megatron's (``get_transformer_layer_offset`` with an even split): chunk
``v`` of pipeline rank ``r`` holds the ``L/(PP·VPP)`` layers starting after
``v·L/VPP + r·L/(PP·VPP)``. Layer kinds come from :mod:`rnope_megatron.pattern`.
"""

from __future__ import annotations


def chunk_layers(num_layers: int, pipeline: int, virtual: int | None, rank: int, chunk: int) -> list[int]:
    """Megatron's global 1-based layer numbers of ``chunk`` on pipeline ``rank``."""
    vpp = virtual or 1
    per_chunk = num_layers // (pipeline * vpp)
    first = chunk * (num_layers // vpp) + rank * per_chunk
    return list(range(first + 1, first + per_chunk + 1))


def stage_layers(model, parallel, rank: int) -> list[int]:
    """Every layer number pipeline ``rank`` holds, over its chunks."""
    return [n for chunk in range(parallel.virtual_pipeline or 1)
            for n in chunk_layers(model.num_layers, parallel.pipeline, parallel.virtual_pipeline, rank, chunk)]


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
            for number in chunk_layers(model.num_layers, parallel.pipeline, parallel.virtual_pipeline, rank, chunk):
                kind = pattern.kind(number)
                layers.append({"layer": number, "kind": kind.letter,
                               "attention": f"window {model.window}" if kind.sliding else "global",
                               "rope": kind.rope})
            chunks.append({"chunk": chunk, "layers": layers})
        extras = (["embedding"] if rank == 0 else []) + (["output layer"] if rank == parallel.pipeline - 1 else [])
        stages.append({"pipeline_rank": rank, "holds": extras, "chunks": chunks})
    return stages
