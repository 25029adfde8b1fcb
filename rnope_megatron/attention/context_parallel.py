"""Context parallelism (CP) for the portable backend: each rank holds part of every
sequence, and attention brings in only what its queries can see.

Layout: Megatron's load-balanced split (``get_batch_on_this_cp_rank``). A sequence of L
tokens is cut into 2·CP chunks of ``c = L / (2·CP)``; rank r holds chunks r and
2·CP−1−r, in that order, as its local sequence of 2c tokens (:class:`ZigZag`). RoPE layers
rotate with the same global positions (:func:`ZigZag.local_positions`).

* **Sliding-window layers (S): halo exchange** (:func:`sliding_context_attention`). A
  chunk starting at token s needs only the K/V of tokens [s−W+1, s): its *halo*. Each
  rank receives its two chunks' halos from whichever ranks hold those tokens (one
  neighbour when c >= W−1; several when chunks are shorter than the window) by
  point-to-point messages of at most W−1 rows each — O(W·D) per chunk, never the
  sequence — straight into the rows before the chunk's own K/V, and runs the local kernel
  on [halo ‖ chunk] with the queries aligned to the end of the keys. In the backward the
  halo's gradients travel back to their owners and are added there (:class:`HaloExchange`).
* **Global layers (G, R): all-gather** (:func:`global_context_attention`). Every rank
  gathers the whole sequence's K/V into one buffer (:func:`gather_kv`) and runs causal attention of each
  local chunk against the key chunks up to its own, one chunk at a time, merged by
  log-sum-exp (:class:`GatheredCausalAttention`). The gathered buffer is freed when the
  forward ends and gathered again in the backward, so a global layer keeps O(L/CP) for
  its backward; the K/V gradients are reduced to each owner, [2c] rows at a time.

Memory per rank is then the CP=1 activations / CP plus the halos (2·(W−1) rows per sliding
layer) plus, transiently, one global layer's gathered K/V (docs/context-parallel-memory.md).

Messages are posted in one global order on every rank, so NCCL (ordered per pair) and gloo
(tagged) match them alike.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from rnope_megatron.attention.sliding_window import (
    _cpu_flash,
    _cpu_flash_backward,
    causal_attention,
    document_attention,
    sliding_window_attention,
)


@dataclasses.dataclass(frozen=True)
class ZigZag:
    """Megatron's causal load-balancing split of a sequence over the CP group."""

    size: int
    """CP ranks."""
    rank: int
    """This rank in the CP group."""
    chunk: int
    """Tokens per chunk (sequence length / (2·size))."""

    @property
    def local_chunks(self) -> tuple[int, int]:
        """Global indices of this rank's two chunks, in local order."""
        return self.rank, 2 * self.size - 1 - self.rank

    def owner(self, chunk: int) -> int:
        return chunk if chunk < self.size else 2 * self.size - 1 - chunk

    @staticmethod
    def slot(chunk: int, size: int) -> int:
        """Where a chunk sits in its owner's local sequence: 0 (first half) or 1."""
        return 0 if chunk < size else 1

    def local_positions(self, device=None) -> torch.Tensor:
        """Global positions of the local tokens (chunk r, then chunk 2·CP−1−r)."""
        first, second = self.local_chunks
        return torch.cat([torch.arange(first * self.chunk, (first + 1) * self.chunk, device=device),
                          torch.arange(second * self.chunk, (second + 1) * self.chunk, device=device)])


def zigzag_of(group, local_length: int) -> ZigZag:
    size = dist.get_world_size(group)
    if local_length % 2:
        raise ValueError(f"a context-parallel rank holds two equal chunks; got {local_length} tokens")
    return ZigZag(size=size, rank=dist.get_rank(group), chunk=local_length // 2)


def document_start(bounds: tuple[int, ...] | None, position: int) -> int:
    """Start of the document holding ``position`` (0 without documents)."""
    if not bounds:
        return 0
    return max(b for b in bounds if b <= position)


def halo_sources(chunk: int, chunk_len: int, window: int, bounds: tuple[int, ...] | None = None
                 ) -> list[tuple[int, int, int]]:
    """(source chunk, first row, end row) of every piece of ``chunk``'s halo, in token
    order: the W−1 tokens before its first one (fewer at the sequence start), and with
    documents (``bounds``: the whole sequence's ``cu_seqlens``) none before the start of
    the first token's document: a chunk that starts a document gets no halo."""
    start = chunk * chunk_len
    need_from = max(0, start - (window - 1), document_start(bounds, start))
    return [(source, max(need_from - source * chunk_len, 0), chunk_len)
            for source in range(need_from // chunk_len, chunk)]


def _transfers(zz: ZigZag, window: int, bounds=None) -> list[tuple[int, int, int, int]]:
    """Every halo piece of every chunk, in one global order: (source, dest, rows)."""
    return [(source, dest, r0, r1) for dest in range(2 * zz.size)
            for source, r0, r1 in halo_sources(dest, zz.chunk, window, bounds)]


def _chunk_rows(local: torch.Tensor, zz: ZigZag, chunk: int) -> torch.Tensor:
    slot = ZigZag.slot(chunk, zz.size)
    return local[slot * zz.chunk:(slot + 1) * zz.chunk]


def _run(ops: list) -> None:
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()


def _halo_rows(zz: ZigZag, transfers) -> dict[int, int]:
    """Rows of each local chunk's halo."""
    return {dest: sum(r1 - r0 for _, d, r0, r1 in transfers if d == dest) for dest in zz.local_chunks}


class HaloExchange(torch.autograd.Function):
    """Local key and value [2c, b, hkv, d] -> each local chunk's K/V with its halo in front,
    [h + c, b, hkv, 2d] per chunk (K and V side by side: one message per halo piece).

    Memory: the two outputs are the only buffers. Halo rows are received straight into
    their rows of the output and the rank's own rows are sent from there, so no halo,
    piece or concatenation outlives the exchange. Nothing is saved for the backward (the
    kernel saves what it needs of the outputs)."""

    @staticmethod
    def forward(ctx, key, value, zz: ZigZag, window: int, group, bounds=None):
        ctx.zz, ctx.window, ctx.group, ctx.bounds = zz, window, group, bounds
        c, dim = zz.chunk, key.shape[-1]
        transfers = _transfers(zz, window, bounds)
        halo = _halo_rows(zz, transfers)
        extended = []
        for slot, dest in enumerate(zz.local_chunks):
            buffer = key.new_empty((halo[dest] + c, *key.shape[1:-1], 2 * dim))
            buffer[halo[dest]:, ..., :dim] = key[slot * c:(slot + 1) * c]
            buffer[halo[dest]:, ..., dim:] = value[slot * c:(slot + 1) * c]
            extended.append(buffer)

        def own_rows(chunk, r0, r1):  # K/V rows of one of this rank's chunks, inside its buffer
            slot = ZigZag.slot(chunk, zz.size)
            return extended[slot][halo[zz.local_chunks[slot]] + r0:halo[zz.local_chunks[slot]] + r1]

        filled = {dest: 0 for dest in zz.local_chunks}
        ops = []
        for index, (source, dest, r0, r1) in enumerate(transfers):
            src_rank, dst_rank = zz.owner(source), zz.owner(dest)
            if dst_rank == zz.rank:
                rows = extended[zz.local_chunks.index(dest)][filled[dest]:filled[dest] + r1 - r0]
                filled[dest] += r1 - r0
                if src_rank == zz.rank:
                    rows.copy_(own_rows(source, r0, r1))
                else:
                    ops.append(dist.P2POp(dist.irecv, rows, dist.get_global_rank(group, src_rank), group, tag=index))
            elif src_rank == zz.rank:
                ops.append(dist.P2POp(dist.isend, own_rows(source, r0, r1), dist.get_global_rank(group, dst_rank),
                                      group, tag=index))
        _run(ops)
        ctx.halo, ctx.dim = halo, dim
        return tuple(extended)

    @staticmethod
    def backward(ctx, *grad_extended):
        zz, window, group, halo, dim = ctx.zz, ctx.window, ctx.group, ctx.halo, ctx.dim
        c = zz.chunk
        grads = [g.contiguous() for g in grad_extended]
        shape = (2 * c, *grads[0].shape[1:-1], dim)
        grad_key, grad_value = grads[0].new_empty(shape), grads[0].new_empty(shape)
        for slot, dest in enumerate(zz.local_chunks):
            grad_key[slot * c:(slot + 1) * c] = grads[slot][halo[dest]:, ..., :dim]
            grad_value[slot * c:(slot + 1) * c] = grads[slot][halo[dest]:, ..., dim:]

        def add_to_own(chunk, r0, r1, rows):
            start = ZigZag.slot(chunk, zz.size) * c
            grad_key[start + r0:start + r1] += rows[..., :dim]
            grad_value[start + r0:start + r1] += rows[..., dim:]

        taken = {dest: 0 for dest in zz.local_chunks}
        ops, received = [], []
        for index, (source, dest, r0, r1) in enumerate(_transfers(zz, window, ctx.bounds)):
            src_rank, dst_rank = zz.owner(source), zz.owner(dest)
            if dst_rank == zz.rank:  # the gradient of this piece of my halo goes to its owner
                piece = grads[zz.local_chunks.index(dest)][taken[dest]:taken[dest] + r1 - r0]
                taken[dest] += r1 - r0
                if src_rank == zz.rank:
                    add_to_own(source, r0, r1, piece)
                else:
                    ops.append(dist.P2POp(dist.isend, piece, dist.get_global_rank(group, src_rank), group, tag=index))
            elif src_rank == zz.rank:
                buffer = grads[0].new_empty((r1 - r0, *grads[0].shape[1:]))
                ops.append(dist.P2POp(dist.irecv, buffer, dist.get_global_rank(group, dst_rank), group, tag=index))
                received.append((source, r0, r1, buffer))
        _run(ops)
        for source, r0, r1, buffer in received:  # a fixed order: the sums do not depend on timing
            add_to_own(source, r0, r1, buffer)
        return grad_key, grad_value, None, None, None, None


def gather_kv(key, value, zz: ZigZag, group) -> torch.Tensor:
    """Every rank's K and V in ONE buffer [CP, 2c, b, hkv, 2d] (rank-major: rank r's
    local rows, chunks r and 2·CP−1−r, at [r]); no per-rank list, no reordered copy.

    NCCL gathers into it directly. gloo's all-gather (list or single tensor) stages the
    whole result in a second buffer of the same size (measured with the allocator), so
    on gloo each rank broadcasts its rows into their view of the buffer instead."""
    dim = key.shape[-1]
    buffer = key.new_empty((zz.size, *key.shape[:-1], 2 * dim))
    if dist.get_backend(group) == "nccl":
        dist.all_gather_into_tensor(buffer.view(-1, *buffer.shape[2:]), torch.cat([key, value], dim=-1),
                                    group=group)
        return buffer
    buffer[zz.rank, ..., :dim] = key
    buffer[zz.rank, ..., dim:] = value
    for source in range(zz.size):
        dist.broadcast(buffer[source], src=dist.get_global_rank(group, source), group=group)
    return buffer


def _chunk_of(gathered: torch.Tensor, zz: ZigZag, chunk: int) -> torch.Tensor:
    """Rows [c, b, hkv, 2d] of global ``chunk`` inside :func:`gather_kv`'s buffer."""
    slot = ZigZag.slot(chunk, zz.size)
    return gathered[zz.owner(chunk), slot * zz.chunk:(slot + 1) * zz.chunk]


def _heads_first(rows: torch.Tensor, dim: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V rows [c, b, hkv, 2d] -> k, v [b, hq, c, d], contiguous, KV heads repeated per
    query head (the CPU flash kernel takes equal head counts)."""
    k, v = (x.permute(1, 2, 0, 3) for x in (rows[..., :dim], rows[..., dim:]))
    if groups == 1:
        return k.contiguous(), v.contiguous()
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _sum_groups(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, hq, c, d] gradient of repeated K/V -> [c, b, hkv, d]."""
    b, hq, c, d = grad.shape
    return grad.view(b, hq // groups, groups, c, d).sum(2).permute(2, 0, 1, 3)


class GatheredCausalAttention(torch.autograd.Function):
    """Causal attention of this rank's two chunks against the whole sequence's K/V, on
    the CPU flash kernel, block by block (one key chunk at a time, merged by log-sum-exp,
    as ring attention does), so no whole-sequence score, mask or token-order copy exists.

    Memory: the gathered K/V buffer lives only inside the forward and again inside the
    backward (it is gathered a second time there rather than kept: each global layer then
    keeps O(L/CP) for its backward — q, local K/V, output, log-sum-exp — instead of
    O(L)). The backward reduces each rank's K/V gradient straight to it, one destination
    at a time ([2c] rows in flight), instead of an all-reduce of a whole-sequence buffer."""

    @staticmethod
    def forward(ctx, query, key, value, zz: ZigZag, scale: float, group):
        c, dim = zz.chunk, key.shape[-1]
        groups = query.shape[2] // key.shape[2]
        gathered = gather_kv(key, value, zz, group)
        batch, heads = query.shape[1], query.shape[2]
        out = query.new_empty((2, batch, heads, c, dim))
        acc = torch.promote_types(query.dtype, torch.float32)  # the kernel's log-sum-exp dtype
        lse = torch.empty((2, batch, heads, c), dtype=acc, device=query.device)
        for slot, q_chunk in enumerate(zz.local_chunks):
            q = query[slot * c:(slot + 1) * c].permute(1, 2, 0, 3).contiguous()
            total = merged = None
            for k_chunk in range(q_chunk + 1):
                k, v = _heads_first(_chunk_of(gathered, zz, k_chunk), dim, groups)
                o, l = _cpu_flash(q, k, v, 0.0, k_chunk == q_chunk, scale=scale)
                del k, v
                if total is None:
                    total, merged = o.to(acc), l
                    continue
                new = torch.logaddexp(merged, l)
                total.mul_(torch.exp(merged - new).unsqueeze(-1)).add_(o.to(acc) * torch.exp(l - new).unsqueeze(-1))
                merged = new
            out[slot].copy_(total)
            lse[slot].copy_(merged)
        del gathered
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.zz, ctx.scale, ctx.group = zz, scale, group
        return out.permute(0, 3, 1, 2, 4).reshape(2 * c, batch, heads, dim)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        zz, scale, group = ctx.zz, ctx.scale, ctx.group
        c, dim = zz.chunk, key.shape[-1]
        groups = query.shape[2] // key.shape[2]
        gathered = gather_kv(key, value, zz, group)
        grad_query = torch.zeros_like(query)
        q = [query[s * c:(s + 1) * c].permute(1, 2, 0, 3).contiguous() for s in range(2)]
        go = [grad_out[s * c:(s + 1) * c].permute(1, 2, 0, 3).contiguous() for s in range(2)]
        grad_local = None
        for owner in range(zz.size):  # the K/V gradient of owner's two chunks, then to owner
            grad_kv = key.new_zeros((2 * c, *key.shape[1:-1], 2 * dim))
            for k_slot, k_chunk in enumerate((owner, 2 * zz.size - 1 - owner)):
                rows = grad_kv[k_slot * c:(k_slot + 1) * c]
                k = v = None
                for q_slot, q_chunk in enumerate(zz.local_chunks):
                    if k_chunk > q_chunk:
                        continue
                    if k is None:
                        k, v = _heads_first(_chunk_of(gathered, zz, k_chunk), dim, groups)
                    g_q, g_k, g_v = _cpu_flash_backward(go[q_slot], q[q_slot], k, v, out[q_slot], lse[q_slot],
                                                        0.0, k_chunk == q_chunk, scale=scale)
                    grad_query[q_slot * c:(q_slot + 1) * c] += g_q.permute(2, 0, 1, 3)
                    rows[..., :dim] += _sum_groups(g_k, groups)
                    rows[..., dim:] += _sum_groups(g_v, groups)
            dist.reduce(grad_kv, dst=dist.get_global_rank(group, owner), group=group)
            if owner == zz.rank:
                grad_local = grad_kv
        return grad_query, grad_local[..., :dim], grad_local[..., dim:], None, None, None


class GatherSequence(torch.autograd.Function):
    """Local [2c, ...] rows -> the whole sequence [2·CP·c, ...] in token order (devices
    other than CPU, whose kernels take the sequence whole)."""

    @staticmethod
    def forward(ctx, local, zz: ZigZag, group):
        ctx.zz, ctx.group = zz, group
        dim = local.shape[-1] // 2
        gathered = gather_kv(local[..., :dim], local[..., dim:], zz, group)
        return torch.cat([_chunk_of(gathered, zz, chunk) for chunk in range(2 * zz.size)])

    @staticmethod
    def backward(ctx, grad_full):
        zz, group = ctx.zz, ctx.group
        c = zz.chunk
        mine = None
        for owner in range(zz.size):  # each rank's rows reduced straight to it
            rows = torch.cat([grad_full[owner * c:(owner + 1) * c],
                              grad_full[(2 * zz.size - 1 - owner) * c:(2 * zz.size - owner) * c]])
            dist.reduce(rows, dst=dist.get_global_rank(group, owner), group=group)
            if owner == zz.rank:
                mine = rows
        return mine, None, None


def context_parallel_group(pg_collection=None):
    """The CP group of Megatron's process-group collection, or Megatron's global one."""
    cp = getattr(pg_collection, "cp", None)
    if cp is None:
        from megatron.core import parallel_state

        cp = parallel_state.get_context_parallel_group()
    return cp


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    """[s, b, h, d] -> [b, h, s, d] (the kernels' layout)."""
    return x.permute(1, 2, 0, 3)


def with_halos(key, value, window: int, group, bounds=None) -> tuple[ZigZag, list[torch.Tensor]]:
    """This rank's two chunks of K and V (concatenated on the last dim), each prefixed with
    its halo: [h + c, b, hkv, 2d] per chunk (the te backend's halo layer runs TE on these)."""
    zz = zigzag_of(group, key.shape[0])
    return zz, list(HaloExchange.apply(key, value, zz, window, group, bounds))


def sliding_context_attention(query, key, value, window: int, scale: float, group, bounds=None) -> torch.Tensor:
    """A sliding layer under CP: the halo exchange, then the local kernel per chunk (with
    documents, ``bounds``: halos stop at the chunk's document start and the kernel masks
    per document)."""
    zz = zigzag_of(group, key.shape[0])
    dim, c = key.shape[-1], zz.chunk
    outputs = []
    for slot, keys in enumerate(HaloExchange.apply(key, value, zz, window, group, bounds)):
        q = _bhsd(query[slot * c:(slot + 1) * c])
        k, v = _bhsd(keys[..., :dim]), _bhsd(keys[..., dim:])
        if bounds is None:
            out = sliding_window_attention(q, k, v, window, scale)
        else:
            out = _per_batch_row(q, k, v, bounds, window, scale, zz.local_chunks[slot] * c)
        outputs.append(out.permute(2, 0, 1, 3))
    return torch.cat(outputs)


def _per_batch_row(q, k, v, bounds, window, scale, q_start):
    """:func:`document_attention` over a [b, h, s, d] block (the boundaries are the same
    sequence's for every row: a THD pack has batch 1)."""
    return torch.cat([document_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], bounds, window, scale, q_start)
                      for i in range(q.shape[0])])


def global_context_attention(query, key, value, scale: float, group, bounds=None) -> torch.Tensor:
    """A global layer under CP: every earlier chunk's K/V gathered into one buffer (with
    documents, ``bounds``: each chunk keeps only the rows from its first token's document
    start and attends per document)."""
    zz = zigzag_of(group, query.shape[0])
    if query.device.type == "cpu" and bounds is None:
        return GatheredCausalAttention.apply(query, key, value, zz, scale, group)
    return sequence_causal_attention(query, key, value, zz, scale, group, bounds)


def sequence_causal_attention(query, key, value, zz: ZigZag, scale: float, group, bounds=None) -> torch.Tensor:
    """Other devices, and documents anywhere: the gathered K/V in token order, each chunk
    against its prefix by :func:`causal_attention` (its kernels take the keys whole; the
    prefix is kept), or, with documents (``bounds``), against a copy of the rows from its
    first token's document start, masked per document."""
    dim, c = key.shape[-1], zz.chunk
    full = GatherSequence.apply(torch.cat([key, value], dim=-1), zz, group)
    outputs = []
    for slot, chunk in enumerate(zz.local_chunks):
        if bounds is None:
            keys = full[:(chunk + 1) * c]
            out = causal_attention(_bhsd(query[slot * c:(slot + 1) * c]), _bhsd(keys[..., :dim]),
                                   _bhsd(keys[..., dim:]), scale)
        else:
            first = document_start(bounds, chunk * c)
            # a copy of the rows the chunk's documents reach, so the gathered sequence is
            # not kept alive by the kernels' saved views
            keys = full[first:(chunk + 1) * c].clone()
            out = _per_batch_row(_bhsd(query[slot * c:(slot + 1) * c]), _bhsd(keys[..., :dim]),
                                 _bhsd(keys[..., dim:]), bounds, None, scale, chunk * c)
        outputs.append(out.permute(2, 0, 1, 3))
    del full
    return torch.cat(outputs)


def context_parallel_attention(query, key, value, window: int | None, scale: float, group,
                               documents=None) -> torch.Tensor:
    """Attention of this rank's two chunks. query [2c, b, hq, d], key/value [2c, b, hkv, d]
    (RoPE already applied with global positions) -> [2c, b, hq, d]. ``documents``: the
    whole sequence's ``cu_seqlens`` (document masking; the sequence-level zig-zag layout
    stays as without documents)."""
    bounds = None if documents is None else tuple(
        int(x) for x in (documents.tolist() if torch.is_tensor(documents) else documents))
    if window is not None:
        return sliding_context_attention(query, key, value, window, scale, group, bounds)
    return global_context_attention(query, key, value, scale, group, bounds)
