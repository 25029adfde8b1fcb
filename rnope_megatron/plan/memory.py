"""Per-GPU memory of a training recipe, by component and pipeline rank.

What is counted, and why (bytes per rank; T = micro_batch x seq_length / CP tokens):

* **weights, grads, optimizer**: the rank's parameters (its layers / TP, plus the
  embedding on the first and the output layer on the last pipeline rank; a tied
  embedding has a copy on the last rank when PP > 1, as Megatron keeps one there). Megatron
  DDP keeps grads in an fp32 buffer whenever params are bf16/fp16 (``grad_reduce_in_fp32``,
  as the engine sets it) or fp32. Adam holds m and v in fp32, plus an fp32 master copy of
  16-bit params: 12 bytes/param (8 with fp32 params); the distributed optimizer shards
  these over the data-parallel x context-parallel ranks (Megatron's ``dp_cp`` group).
* **activations**: what autograd keeps per layer for the backward, per micro-batch,
  times the micro-batches in flight on that pipeline rank (1F1B: ``min(PP - r, m)``;
  interleaved: ``min(2(PP-r-1) + (VPP-1)·PP + 1, m·VPP)`` chunks, Megatron's warm-up
  count plus the forward before the first backward). Per layer kind: norms, attention,
  MLP, and the K/V that context parallelism brings in and keeps. Attention keeps O(T)
  tensors for both kinds (flash-style kernels on te; the CPU kernels on portable keep q,
  K/V repeated per query head, output and log-sum-exp): neither stores a score matrix.
  The window shows in memory where it bounds what a rank brings in: a sliding layer's
  halo is 2·(W-1) keys per rank, kept; a global layer's all-gather brings in the whole
  sequence's K/V for the duration of its forward and of its backward (transient).
* **recompute**: ``selective`` recomputes core attention (keeps its inputs and output);
  ``full`` keeps each layer's input only and rebuilds one layer at a time.
* **transient**: one layer's activations (two under full recompute: rebuilt + their
  grads) while it runs backward; CP buffers used and freed within a layer (TE's ring
  double buffer, TE's all-gather); and on the last rank the logits and their
  cross-entropy (Megatron's unfused vocab-parallel loss: fp32 copy kept as the
  softmax, plus the 16-bit logits or their gradient alongside).
* **runtime reserve** (GPU only): CUDA context, NCCL buffers, cuBLAS/TE workspaces.
"""

from __future__ import annotations

import dataclasses

from rnope_megatron.plan.layers import stage_layers

GB = 1e9
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# CUDA context (~0.5 GB), NCCL communicator buffers, cuBLAS and TE workspaces.
RUNTIME_RESERVE_GB = 4.0
# Allocator fragmentation: a layout must fit in this share of the device.
USABLE_FRACTION = 0.95


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the memory model needs from a recipe and a world size."""

    dtype_bytes: int
    backend: str
    fused: bool
    """Megatron's CUDA fusions on (fused SwiGLU keeps its input only)."""
    distributed_optimizer: bool
    recompute: str | None
    tensor: int
    pipeline: int
    virtual: int | None
    context: int
    sequence_parallel: bool
    data_parallel: int
    micro_batch: int
    seq_length: int
    num_microbatches: int
    on_gpu: bool
    comm_sliding: str | None = None
    """CP communication of sliding / global layers (RNoPEConfig.cp_comm_types decides)."""
    comm_global: str | None = None

    @classmethod
    def of(cls, recipe, data_parallel: int, on_gpu: bool = True) -> "Setup":
        t, p, o = recipe.train, recipe.parallel, recipe.optimizer
        comm = dict(zip(recipe.model.layer_pattern.layers, recipe.model.cp_comm_types(p, t.backend)))
        return cls(
            comm_sliding=comm.get("S"), comm_global=comm.get("G", comm.get("R")), dtype_bytes=DTYPE_BYTES[t.precision], backend=t.backend,
            fused=on_gpu if t.fusions is None else t.fusions,
            distributed_optimizer=on_gpu if o.distributed is None else o.distributed,
            recompute=t.recompute, tensor=p.tensor, pipeline=p.pipeline, virtual=p.virtual_pipeline,
            context=p.context, sequence_parallel=p.sequence_parallel, data_parallel=data_parallel,
            micro_batch=t.micro_batch_size, seq_length=t.seq_length,
            num_microbatches=t.global_batch_size // (t.micro_batch_size * data_parallel), on_gpu=on_gpu,
        )

    @property
    def virtual_pipeline(self) -> int | None:
        """As ParallelLayout names it (so a Setup serves layers.stage_layers)."""
        return self.virtual

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch on one rank."""
        return self.micro_batch * self.seq_length // self.context


# ----------------------------------------------------------------------- parameters

def layer_params(model, tensor: int, backend: str) -> float:
    """Parameters of one transformer layer on one TP rank."""
    h, q, kv = model.hidden_size, model.num_attention_heads * model.head_dim, model.query_groups * model.head_dim
    linear = (h * (q + 2 * kv) + q * h + 3 * h * model.ffn_size) / tensor
    norms = 1 if model.block == "parallel" else 2
    # TE's LayerNorm always has a bias (kept at zero, frozen, but allocated)
    per_norm = h * (2 if backend == "te" and model.normalization == "LayerNorm" else 1)
    qk = 2 * model.head_dim * (model.qk_norm_local or model.qk_norm_global)
    return linear + norms * per_norm + qk


def stage_params(model, setup: Setup, rank: int) -> float:
    """Parameters held by pipeline ``rank`` (one TP rank)."""
    count = len(stage_layers(model, setup, rank)) * layer_params(model, setup.tensor, setup.backend)
    vocab = model.vocab_size * model.hidden_size / setup.tensor
    if rank == 0:
        count += vocab
    if rank == setup.pipeline - 1:
        count += model.hidden_size  # final norm
        if not model.tie_embeddings or setup.pipeline > 1:
            count += vocab  # output layer (a tied one is a copy of the embedding when PP > 1)
    return count


def static_bytes(params: float, setup: Setup) -> dict[str, float]:
    """Weights, fp32 gradient buffer and Adam state for ``params`` parameters."""
    state = 8 if setup.dtype_bytes == 4 else 12  # m, v (+ fp32 master copy of 16-bit params)
    shards = setup.data_parallel * setup.context if setup.distributed_optimizer else 1
    return {"weights": params * setup.dtype_bytes, "grads": params * 4, "optimizer": params * state / shards}


# ----------------------------------------------------------------------- activations

def layer_activation_bytes(model, kind, setup: Setup) -> dict[str, float]:
    """Bytes one layer of ``kind`` keeps for its backward, for one micro-batch."""
    h, heads = model.hidden_size, model.num_attention_heads
    q, kv = heads * model.head_dim, model.query_groups * model.head_dim
    T, B, t = setup.tokens, setup.dtype_bytes, setup.tensor
    sp = t if setup.sequence_parallel else 1
    norms = 1 if model.block == "parallel" else 2
    if setup.recompute == "full":
        # Megatron checkpoints the layer input only (SP-sharded with sequence parallel)
        return {"norms": 0.0, "attention": 0.0, "mlp": 0.0, "context_parallel": 0.0, "layer_input": T * h * B / sp}
    if setup.backend == "te":
        norm = 2 * h * B  # fused norm-linear keeps its input and the normed output
        if setup.recompute == "selective":
            attention = (q + 2 * kv) * B + q * B  # checkpoint inputs + output
        elif kind.rope:
            # RoPE writes new q, k; v stays a view of the QKV output, which stays alive
            attention = (q + kv) * B + (q + 2 * kv) * B + q * B + 4 * heads
        else:
            attention = (q + 2 * kv) * B + q * B + 4 * heads  # q, k, v views + output + lse
        kv_kept = kv
    else:
        norm = 2 * h * 4 + h * B  # fp32 input and normed copy, output in the param dtype
        if setup.recompute == "selective":
            attention = (q + 2 * kv) * B + q * B
        else:
            # q, K and V repeated per query head, output, its [s, b, h·d] copy; lse fp32
            attention = 5 * q * B + 4 * heads
        kv_kept = kv if setup.recompute == "selective" else q
    mlp = (3 if setup.fused else 4) * model.ffn_size * B  # fc1 out (2·ffn), act out (+ silu out unfused)
    result = {"norms": T * norms * norm / sp, "attention": T * attention / t, "mlp": T * mlp / t,
              "context_parallel": 0.0, "layer_input": 0.0}
    if setup.context > 1:
        comm = setup.comm_sliding if kind.sliding else setup.comm_global
        seqs = setup.micro_batch
        if comm == "halo":  # the W-1 keys before each of the rank's two chunks, kept with K/V
            result["context_parallel"] = seqs * 2 * (model.window - 1) * 2 * kv_kept * B / t
        # all_gather keeps nothing extra on either backend: the portable one gathers again
        # in the backward (cp_transient_bytes counts the gathered buffer)
    return result


def cp_transient_bytes(model, setup: Setup) -> float:
    """CP buffers a layer fills and frees within its own forward/backward (TE's ring
    double buffer; the all-gather of K/V, which the portable backend gathers again in
    the backward instead of keeping), the largest over the layer kinds."""
    if setup.context == 1:
        return 0.0
    kv, B, t = model.query_groups * model.head_dim, setup.dtype_bytes, setup.tensor
    seqs, local, full = setup.micro_batch, setup.seq_length // setup.context, setup.seq_length
    sizes = {"p2p": 2 * local, "all_gather": full, "a2a": local, "halo": 0}
    kinds = {setup.comm_global} | ({setup.comm_sliding} if model.layer_pattern.has_sliding else set())
    return max(seqs * sizes[c] * 2 * kv * B / t for c in kinds)


def in_flight_layers(setup: Setup, rank: int, layers_on_rank: int) -> float:
    """Layer-micro-batches whose activations pipeline ``rank`` holds at its peak."""
    m = setup.num_microbatches
    if setup.pipeline == 1:
        return layers_on_rank  # one micro-batch at a time
    if not setup.virtual:
        return min(setup.pipeline - rank, m) * layers_on_rank
    chunks = min(2 * (setup.pipeline - rank - 1) + (setup.virtual - 1) * setup.pipeline + 1, m * setup.virtual)
    return chunks * layers_on_rank / setup.virtual


def logits_bytes(model, setup: Setup) -> float:
    """Peak of the logits and their cross-entropy on the last rank, one micro-batch."""
    extra = 0 if setup.dtype_bytes == 4 else setup.dtype_bytes  # 16-bit logits / their grad
    return setup.tokens * model.vocab_size / setup.tensor * (4 + extra)


@dataclasses.dataclass
class StageMemory:
    """Peak memory of one pipeline rank, by component (bytes)."""

    rank: int
    components: dict
    """weights, grads, optimizer, activations, transient, logits, runtime_reserve."""
    activations_by_kind: dict
    """Per layer kind: the bytes one layer keeps for one micro-batch, by part."""
    in_flight_layers: float
    optimizer_not_distributed: float
    """The optimizer component without the distributed optimizer (for comparison)."""

    @property
    def total(self) -> float:
        return sum(self.components.values())


def stage_memory(recipe, setup: Setup, rank: int) -> StageMemory:
    """Peak memory of pipeline ``rank`` under ``setup``."""
    model = recipe.model
    params = stage_params(model, setup, rank)
    components = static_bytes(params, setup)
    layers = stage_layers(model, setup, rank)
    by_kind = {}
    for letter in sorted(set(model.layer_pattern.layers[n - 1] for n in layers)):
        by_kind[letter] = layer_activation_bytes(model, model.layer_pattern.kind(
            model.layer_pattern.layers.index(letter) + 1), setup)
    per_layer = [sum(by_kind[model.layer_pattern.layers[n - 1]].values()) for n in layers]
    average = sum(per_layer) / len(per_layer)
    flight = in_flight_layers(setup, rank, len(layers))
    components["activations"] = flight * average
    # the layer running backward: its activations (rebuilt first under full recompute)
    # and their gradients
    full = dataclasses.replace(setup, recompute=None) if setup.recompute == "full" else setup
    working = max(sum(layer_activation_bytes(model, model.layer_pattern.kind(n), full).values()) for n in layers)
    components["transient"] = working * (2 if setup.recompute == "full" else 1) + cp_transient_bytes(model, setup)
    components["logits"] = logits_bytes(model, setup) if rank == setup.pipeline - 1 else 0.0
    components["runtime_reserve"] = RUNTIME_RESERVE_GB * GB if setup.on_gpu else 0.0
    plain = static_bytes(params, dataclasses.replace(setup, distributed_optimizer=False))["optimizer"]
    return StageMemory(rank, components, by_kind, flight, plain)


def plan_memory(recipe, setup: Setup) -> list[StageMemory]:
    """Every pipeline rank's peak memory."""
    return [stage_memory(recipe, setup, rank) for rank in range(setup.pipeline)]
