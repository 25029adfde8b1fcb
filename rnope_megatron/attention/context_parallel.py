"""Context parallelism (CP) for the portable backend: each rank holds part of every
sequence, and attention brings in only what its queries can see.

Layout: Megatron's load-balanced split (``get_batch_on_this_cp_rank``). A sequence of L
tokens is cut into 2·CP chunks of ``c = L / (2·CP)``; rank r holds chunks r and
2·CP−1−r, in that order, as its local sequence of 2c tokens (:class:`ZigZag`). RoPE layers
rotate with the same global positions (:func:`ZigZag.local_positions`).

* **Sliding-window layers (S): halo exchange.** A chunk starting at token s needs only
  the K/V of tokens [s−W+1, s): its *halo*. Each rank receives its two chunks' halos from
  whichever ranks hold those tokens (one neighbour when c >= W−1; several when chunks are
  shorter than the window) by point-to-point messages of at most W−1 rows each — O(W·D)
  per chunk, never the sequence — and runs the local kernel on [halo ‖ chunk] with the
  queries aligned to the end of the keys. In the backward the halo's gradients travel
  back to their owners and are added there (:class:`HaloExchange`).
* **Global layers (G, R): all-gather.** Every rank gathers the whole sequence's K/V (O(L)
  memory and traffic, on these layers only) and runs causal attention of each local
  chunk against the keys up to its end; the backward sums the K/V gradients of all ranks
  and hands each rank its chunks (:class:`GatherSequence`).

Messages are posted in one global order on every rank, so NCCL (ordered per pair) and gloo
(tagged) match them alike.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from rnope_megatron.attention.sliding_window import causal_attention, sliding_window_attention


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


def halo_sources(chunk: int, chunk_len: int, window: int) -> list[tuple[int, int, int]]:
    """(source chunk, first row, end row) of every piece of ``chunk``'s halo, in token
    order: the W−1 tokens before its first one (fewer at the sequence start)."""
    start = chunk * chunk_len
    need_from = max(0, start - (window - 1))
    return [(source, max(need_from - source * chunk_len, 0), chunk_len)
            for source in range(need_from // chunk_len, chunk)]


def _transfers(zz: ZigZag, window: int) -> list[tuple[int, int, int, int]]:
    """Every halo piece of every chunk, in one global order: (source, dest, rows)."""
    return [(source, dest, r0, r1) for dest in range(2 * zz.size)
            for source, r0, r1 in halo_sources(dest, zz.chunk, window)]


def _chunk_rows(local: torch.Tensor, zz: ZigZag, chunk: int) -> torch.Tensor:
    slot = ZigZag.slot(chunk, zz.size)
    return local[slot * zz.chunk:(slot + 1) * zz.chunk]


def _run(ops: list) -> None:
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()


class HaloExchange(torch.autograd.Function):
    """Local [2c, ...] rows (two chunks) -> the two chunks' halos [h0, ...], [h1, ...]."""

    @staticmethod
    def forward(ctx, local, zz: ZigZag, window: int, group):
        ctx.zz, ctx.window, ctx.group = zz, window, group
        ctx.local_shape = local.shape
        pieces: dict[int, torch.Tensor] = {}
        ops = []
        transfers = _transfers(zz, window)
        for index, (source, dest, r0, r1) in enumerate(transfers):
            src_rank, dst_rank = zz.owner(source), zz.owner(dest)
            if src_rank == zz.rank and dst_rank == zz.rank:
                pieces[index] = _chunk_rows(local, zz, source)[r0:r1]
            elif src_rank == zz.rank:
                send = _chunk_rows(local, zz, source)[r0:r1].contiguous()
                ops.append(dist.P2POp(dist.isend, send, dist.get_global_rank(group, dst_rank), group, tag=index))
            elif dst_rank == zz.rank:
                pieces[index] = torch.empty((r1 - r0, *local.shape[1:]), dtype=local.dtype, device=local.device)
                ops.append(dist.P2POp(dist.irecv, pieces[index], dist.get_global_rank(group, src_rank), group,
                                      tag=index))
        _run(ops)
        halos = []
        for dest in zz.local_chunks:
            parts = [pieces[i] for i, t in enumerate(transfers) if t[1] == dest]
            halos.append(torch.cat(parts) if parts else local.new_empty((0, *local.shape[1:])))
        return tuple(halos)

    @staticmethod
    def backward(ctx, *grad_halos):
        zz, window, group = ctx.zz, ctx.window, ctx.group
        grad = grad_halos[0].new_zeros(ctx.local_shape)
        offsets = {dest: 0 for dest in zz.local_chunks}
        ops, received = [], []
        for index, (source, dest, r0, r1) in enumerate(_transfers(zz, window)):
            src_rank, dst_rank = zz.owner(source), zz.owner(dest)
            piece = None
            if dst_rank == zz.rank:  # the gradient of this piece of my halo
                slot_grad = grad_halos[zz.local_chunks.index(dest)]
                piece = slot_grad[offsets[dest]:offsets[dest] + r1 - r0]
                offsets[dest] += r1 - r0
            if src_rank == zz.rank and dst_rank == zz.rank:
                _chunk_rows(grad, zz, source)[r0:r1] += piece
            elif dst_rank == zz.rank:
                ops.append(dist.P2POp(dist.isend, piece.contiguous(), dist.get_global_rank(group, src_rank), group,
                                      tag=index))
            elif src_rank == zz.rank:
                buffer = torch.empty((r1 - r0, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
                ops.append(dist.P2POp(dist.irecv, buffer, dist.get_global_rank(group, dst_rank), group, tag=index))
                received.append((source, r0, r1, buffer))
        _run(ops)
        for source, r0, r1, buffer in received:  # a fixed order: the sums do not depend on timing
            _chunk_rows(grad, zz, source)[r0:r1] += buffer
        return grad, None, None, None


class GatherSequence(torch.autograd.Function):
    """Local [2c, ...] rows -> the whole sequence [2·CP·c, ...] in token order."""

    @staticmethod
    def forward(ctx, local, zz: ZigZag, group):
        ctx.zz, ctx.group = zz, group
        local = local.contiguous()
        gathered = [torch.empty_like(local) for _ in range(zz.size)]
        dist.all_gather(gathered, local, group=group)
        chunks = [None] * (2 * zz.size)
        for rank, rows in enumerate(gathered):
            chunks[rank], chunks[2 * zz.size - 1 - rank] = rows[:zz.chunk], rows[zz.chunk:]
        return torch.cat(chunks)

    @staticmethod
    def backward(ctx, grad_full):
        zz, group = ctx.zz, ctx.group
        c = zz.chunk
        by_rank = torch.cat([torch.cat([grad_full[r * c:(r + 1) * c],
                                        grad_full[(2 * zz.size - 1 - r) * c:(2 * zz.size - r) * c]])
                             for r in range(zz.size)])
        if dist.get_backend(group) == "nccl":
            mine = torch.empty_like(by_rank[:2 * c])
            dist.reduce_scatter_tensor(mine, by_rank.contiguous(), group=group)
        else:  # gloo has no reduce-scatter: sum everything, keep this rank's rows
            dist.all_reduce(by_rank, group=group)
            mine = by_rank[zz.rank * 2 * c:(zz.rank + 1) * 2 * c]
        return mine, None, None


def context_parallel_group(pg_collection=None):
    """The CP group of Megatron's process-group collection, or Megatron's global one."""
    cp = getattr(pg_collection, "cp", None)
    if cp is None:
        from megatron.core import parallel_state

        cp = parallel_state.get_context_parallel_group()
    return cp


def with_halos(key, value, window: int, group) -> tuple[ZigZag, list[torch.Tensor]]:
    """This rank's two chunks of K and V (concatenated on the last dim, one exchange for
    both), each prefixed with its halo: [h + c, b, hkv, 2d] per chunk."""
    zz = zigzag_of(group, key.shape[0])
    kv = torch.cat([key, value], dim=-1)
    halos = HaloExchange.apply(kv, zz, window, group)
    return zz, [torch.cat([halo, kv[slot * zz.chunk:(slot + 1) * zz.chunk]]) for slot, halo in enumerate(halos)]


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    """[s, b, h, d] -> [b, h, s, d] (the kernels' layout)."""
    return x.permute(1, 2, 0, 3)


def context_parallel_attention(query, key, value, window: int | None, scale: float, group) -> torch.Tensor:
    """Attention of this rank's two chunks. query [2c, b, hq, d], key/value [2c, b, hkv, d]
    (RoPE already applied with global positions) -> [2c, b, hq, d]."""
    dim = key.shape[-1]
    if window is not None:
        zz, extended = with_halos(key, value, window, group)
    else:
        zz = zigzag_of(group, query.shape[0])
        full = GatherSequence.apply(torch.cat([key, value], dim=-1), zz, group)
        extended = [full[:(chunk + 1) * zz.chunk] for chunk in zz.local_chunks]
    c = zz.chunk
    outputs = []
    for slot, keys in enumerate(extended):
        q = _bhsd(query[slot * c:(slot + 1) * c])
        k, v = _bhsd(keys[..., :dim]), _bhsd(keys[..., dim:])
        if window is not None:
            out = sliding_window_attention(q, k, v, window, scale)
        else:
            out = causal_attention(q, k, v, scale)
        outputs.append(out.permute(2, 0, 1, 3))
    return torch.cat(outputs)
