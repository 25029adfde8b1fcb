"""Causal attention kernels for the portable backend: sliding window in O(L·W), global causal.

Window semantics follow Hugging Face: with ``window=W`` query ``i`` sees key ``j`` iff
``i - W < j <= i`` (W keys, the current one included).

CPU, float32/float64: a native banded kernel (``native_cpu.py`` builds
``csrc/sliding_window_cpu.cpp`` on first use) walks exactly the band of each query block,
flash-style, forward and backward. It is the default; ``RNOPE_SWA_CPU_KERNEL=sdpa``
selects the pure-torch path below, which is also the fallback when no compiler is found
and the path for other dtypes (bf16).

CPU, pure torch: queries are cut into tiles of ``Bq < W`` tokens. A tile starting at ``a`` sees keys
``[a-W+1, a+Bq)``, which splits into two calls of torch's fused CPU flash kernel:

* the tile against itself, a plain causal block (``is_causal=True``, no mask);
* the tile against the ``W-1`` keys before it, read through an overlapping strided view
  (no copy). Query row ``r`` sees column ``c`` iff ``c >= r``: one small ``[Bq, W-1]`` mask
  shared by every tile, which the kernel broadcasts (strides 0), so no O(L·W) mask exists.

The two partial softmaxes are merged by log-sum-exp, as ring/flash attention does.
Backward calls the kernel's own backward on each part with the *merged* output and
log-sum-exp, which yields the gradients of the combined softmax; key/value gradients of the
overlapping windows are folded back with a few strided adds. The first ``P`` positions
(fewer than ``W + Bq``), whose window would reach before the sequence start, are one
small masked call. Cost ≈ L·(W + Bq/2) key visits, memory O(L·W/Bq) = O(L).

CUDA: FlexAttention with a block mask (forward and backward), when torch has it.
Anything else falls back to SDPA with a dense mask (O(L²) memory) and says so once.

Keys may start before the queries (``Lk > Lq``): the queries are then the *last* ``Lq``
positions of the keys ("bottom-right" alignment), as for a context-parallel chunk whose
keys are prefixed with the halo of earlier tokens (sliding layers) or with the gathered
earlier chunks (global layers). Every path handles it: the native kernel natively, the
pure-torch sliding path by zero query rows in front (their outputs are dropped and, having
no gradient, they add nothing to dK/dV), global layers on CPU as two flash calls (the
earlier keys unmasked, the diagonal block causal) merged by log-sum-exp.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F

from rnope_megatron.attention.native_cpu import native_kernel_usable, sliding_window_cpu

_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def sliding_window_mask(seq_len: int, window: int, device=None, kv_len: int | None = None) -> torch.Tensor:
    """Boolean [Lq, Lk] mask, True where query i may attend key j (HF window semantics);
    query i sits at key position ``i + Lk - Lq`` (``kv_len`` defaults to ``seq_len``)."""
    kv_len = seq_len if kv_len is None else kv_len
    i = torch.arange(seq_len, device=device)[:, None] + (kv_len - seq_len)
    j = torch.arange(kv_len, device=device)[None, :]
    return (j <= i) & (j > i - window)


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, float("-inf"))


def query_tile(window: int) -> int:
    """Query tile for the CPU kernel (must be < window). Larger tiles feed the flash kernel
    bigger GEMM blocks; each tile costs Bq/2 wasted key visits per row. 192 and W/4 were the
    fastest measured settings (benchmarks/attention.py)."""
    return max(1, min(window // 2, max(192, window // 4)))


class _BlockedSlidingWindowCPU(torch.autograd.Function):
    """Exact sliding-window attention on the CPU flash kernel (see module docstring).

    Takes q, k, v as [B, H, L, D] with equal head counts and ``L = P + N·Bq``."""

    @staticmethod
    def _layout(q, window, tile):
        batch, heads, seq, dim = q.shape
        prefix = -(-(window - 1) // tile) * tile
        return batch * heads, seq, dim, prefix, (seq - prefix) // tile

    @staticmethod
    def _windows(x, window, tile, prefix, n_tiles):
        """Overlapping view [BH, N, W-1, D]: the W-1 keys before each body tile."""
        bh, seq, dim = x.shape
        return x.as_strided(
            (bh, n_tiles, window - 1, dim), (seq * dim, tile * dim, dim, 1),
            x.storage_offset() + (prefix - window + 1) * dim,
        )

    @staticmethod
    def forward(ctx, q, k, v, window: int, tile: int, scale: float):
        bh, seq, dim, prefix, n = _BlockedSlidingWindowCPU._layout(q, window, tile)
        shape = q.shape
        q, k, v = (x.contiguous().view(bh, seq, dim) for x in (q, k, v))
        prefix_mask = _additive(sliding_window_mask(prefix, window), q.dtype)
        rest_mask = _additive(
            torch.arange(window - 1)[None, :] >= torch.arange(tile)[:, None], q.dtype
        )
        out = torch.empty_like(q)
        o_p, l_p = _cpu_flash(
            q[:, None, :prefix], k[:, None, :prefix], v[:, None, :prefix], 0.0, False,
            attn_mask=prefix_mask, scale=scale,
        )
        lse = torch.empty(bh, seq, dtype=l_p.dtype)
        out[:, :prefix], lse[:, :prefix] = o_p[:, 0], l_p[:, 0]
        if n:
            body = lambda x: x[:, prefix:].view(bh, n, tile, dim)  # noqa: E731
            windows = functools.partial(
                _BlockedSlidingWindowCPU._windows, window=window, tile=tile, prefix=prefix,
                n_tiles=n,
            )
            o_d, l_d = _cpu_flash(body(q), body(k), body(v), 0.0, True, scale=scale)
            o_r, l_r = _cpu_flash(
                body(q), windows(k), windows(v), 0.0, False, attn_mask=rest_mask, scale=scale
            )
            merged = torch.logaddexp(l_d, l_r)
            acc = torch.promote_types(o_d.dtype, torch.float32)  # fp64 stays fp64
            o_b = o_d.to(acc) * torch.exp(l_d - merged).unsqueeze(-1)
            o_b += o_r.to(acc) * torch.exp(l_r - merged).unsqueeze(-1)
            body(out).copy_(o_b)
            lse[:, prefix:] = merged.reshape(bh, n * tile)
        ctx.save_for_backward(q, k, v, out, lse, prefix_mask, rest_mask)
        ctx.window, ctx.tile, ctx.scale = window, tile, scale
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, prefix_mask, rest_mask = ctx.saved_tensors
        window, tile, scale = ctx.window, ctx.tile, ctx.scale
        bh, seq, dim = q.shape
        prefix = -(-(window - 1) // tile) * tile
        n = (seq - prefix) // tile
        shape = grad_out.shape
        go = grad_out.contiguous().view(bh, seq, dim)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        head = lambda x: x[:, None, :prefix]  # noqa: E731
        grads = _cpu_flash_backward(
            head(go), head(q), head(k), head(v), head(out), lse[:, None, :prefix], 0.0, False,
            attn_mask=prefix_mask, scale=scale,
        )
        for dst, g in zip((dq, dk, dv), grads):
            dst[:, :prefix] = g[:, 0]
        if n:
            body = lambda x: x[:, prefix:].view(bh, n, tile, dim)  # noqa: E731
            lse_b = lse[:, prefix:].view(bh, n, tile)
            grads = _cpu_flash_backward(
                body(go), body(q), body(k), body(v), body(out), lse_b, 0.0, True, scale=scale
            )
            for dst, g in zip((dq, dk, dv), grads):
                body(dst).copy_(g)
            windows = functools.partial(
                _BlockedSlidingWindowCPU._windows, window=window, tile=tile, prefix=prefix,
                n_tiles=n,
            )
            g_q, g_k, g_v = _cpu_flash_backward(
                body(go), body(q), windows(k), windows(v), body(out), lse_b, 0.0, False,
                attn_mask=rest_mask, scale=scale,
            )
            body(dq).add_(g_q)
            # Fold the overlapping windows back: chunk s of every window covers a disjoint
            # strided range, so each chunk is one in-place add.
            for start in range(0, window - 1, tile):
                width = min(tile, window - 1 - start)
                offset = (prefix - window + 1 + start) * dim
                for dst, g in ((dk, g_k), (dv, g_v)):
                    dst.as_strided((bh, n, width, dim), (seq * dim, tile * dim, dim, 1), offset).add_(
                        g[:, :, start : start + width]
                    )
        return dq.view(shape), dk.view(shape), dv.view(shape), None, None, None


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention_available(device: torch.device) -> bool:
    """FlexAttention trains (forward + backward) on CUDA only; on CPU it is forward-only."""
    if device.type != "cuda":
        return False
    try:
        import torch.nn.attention.flex_attention  # noqa: F401  (availability check)
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=64)
def _flex_block_mask(q_len: int, kv_len: int, window: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(
        sliding_window_mask_mod(window, kv_len - q_len), B=None, H=None, Q_LEN=q_len, KV_LEN=kv_len,
        device=device,
    )


def sliding_window_mask_mod(window: int, q_offset: int = 0):
    """FlexAttention mask_mod for the HF window (shared by the CUDA path and its tests);
    query ``q_idx`` sits at key position ``q_idx + q_offset``."""

    def mask_mod(b, h, q_idx, kv_idx):
        position = q_idx + q_offset
        return (kv_idx <= position) & (kv_idx > position - window)

    return mask_mod


@functools.cache
def _warn_dense_fallback(device_type: str) -> None:
    warnings.warn(
        f"sliding-window attention on {device_type} has no blocked kernel here; using SDPA "
        "with a dense mask (O(L^2) memory). Install a torch with FlexAttention for O(L·W).",
        stacklevel=3,
    )


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float | None = None
) -> torch.Tensor:
    """Causal attention restricted to the last ``window`` keys (HF semantics).

    Args:
        q: [B, Hq, Lq, D]. k, v: [B, Hkv, Lk, D] with Hq a multiple of Hkv (GQA) and
            Lk >= Lq: the queries are the last Lq key positions (Lk > Lq: a halo of
            earlier keys, e.g. from other context-parallel ranks).
        window: W >= 1 keys visible per query, the current one included.
        scale: softmax scale, default 1/sqrt(D).
    Returns: [B, Hq, Lq, D].
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    seq, kv_len, d = q.shape[2], k.shape[2], q.shape[3]
    if kv_len < seq:
        raise ValueError(f"keys ({kv_len}) must cover the queries ({seq})")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if kv_len - seq > window - 1:  # keys no query sees: drop them (their gradient is zero)
        k, v = (x[:, :, kv_len - seq - (window - 1):] for x in (k, v))
        kv_len = seq + window - 1
    if kv_len <= window:  # the window covers everything: plain causal attention
        return causal_attention(q, k, v, scale)
    offset = kv_len - seq
    groups = q.shape[1] // k.shape[1]
    if q.device.type == "cpu":
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        if window == 1:  # every query sees only itself
            return v[:, :, offset:].clone()
        if native_kernel_usable(q.dtype):
            return sliding_window_cpu(q, k, v, window, scale)
        if offset:  # zero queries in front: outputs dropped, no gradient into K/V
            out = sliding_window_attention(F.pad(q, (0, 0, offset, 0)), k, v, window, scale)
            return out[:, :, offset:]
        tile = query_tile(window)
        prefix = -(-(window - 1) // tile) * tile
        pad = prefix - seq if seq <= prefix else (-(seq - prefix)) % tile
        if pad:  # padded keys sit after every real query, so the band mask hides them
            q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        out = _BlockedSlidingWindowCPU.apply(q, k, v, window, tile, scale)
        return out[:, :, :seq] if pad else out
    if flex_attention_available(q.device):
        mask = _flex_block_mask(seq, kv_len, window, str(q.device))
        return _compiled_flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=groups > 1)
    _warn_dense_fallback(q.device.type)
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    mask = sliding_window_mask(seq, window, q.device, kv_len=kv_len)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class _OffsetCausalCPU(torch.autograd.Function):
    """Causal attention of Lq queries that are the last Lq of Lk keys, on torch's CPU flash
    kernel without a mask: the earlier keys [0, Lk-Lq) are visible to every query (one
    unmasked call), the last Lq keys form an ordinary causal block (one ``is_causal``
    call); the two are merged by log-sum-exp and their backward calls receive the merged
    output and log-sum-exp, which gives the gradients of the combined softmax."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        offset = k.shape[2] - q.shape[2]
        parts = ((k[:, :, :offset], v[:, :, :offset], False), (k[:, :, offset:], v[:, :, offset:], True))
        results = [_cpu_flash(q, pk, pv, 0.0, causal, scale=scale) for pk, pv, causal in parts]
        (o_past, l_past), (o_diag, l_diag) = results
        lse = torch.logaddexp(l_past, l_diag)
        acc = torch.promote_types(q.dtype, torch.float32)
        out = (o_past.to(acc) * torch.exp(l_past - lse).unsqueeze(-1)
               + o_diag.to(acc) * torch.exp(l_diag - lse).unsqueeze(-1)).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        offset = k.shape[2] - q.shape[2]
        grad_out = grad_out.contiguous()
        past = _cpu_flash_backward(grad_out, q, k[:, :, :offset], v[:, :, :offset], out, lse, 0.0, False,
                                   scale=ctx.scale)
        diag = _cpu_flash_backward(grad_out, q, k[:, :, offset:], v[:, :, offset:], out, lse, 0.0, True,
                                   scale=ctx.scale)
        dk = torch.cat([past[1], diag[1]], dim=2)
        dv = torch.cat([past[2], diag[2]], dim=2)
        return past[0] + diag[0], dk, dv, None


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Full causal attention (global layers). Shapes as :func:`sliding_window_attention`
    (Lk > Lq: the queries are the last Lq positions)."""
    groups = q.shape[1] // k.shape[1]
    seq, kv_len = q.shape[2], k.shape[2]
    if q.device.type == "cpu":
        # SDPA's enable_gqa path leaves the CPU flash kernel; repeating K/V keeps it.
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        if kv_len > seq:
            scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
            return _OffsetCausalCPU.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if kv_len > seq:
        from torch.nn.attention.bias import causal_lower_right

        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(seq, kv_len), scale=scale)
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=groups > 1
    )


# ---------------------------------------------------------------------------------------
# Document masking
# ---------------------------------------------------------------------------------------


def document_lengths(cu_seqlens: torch.Tensor | list[int], total: int) -> list[int]:
    """Document lengths from Megatron's ``cu_seqlens`` ([0, e_1, ..., e_n], int), checked to
    tile ``[0, total)`` exactly: one line naming the field otherwise."""
    bounds = [int(x) for x in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at the sequence length {total}, got "
            f"{bounds[:4]}{'...' if len(bounds) > 4 else ''}{bounds[-1:] if len(bounds) > 4 else ''}"
        )
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if min(lengths) < 1:
        raise ValueError(f"cu_seqlens must be strictly increasing (empty document), got {bounds}")
    return lengths


def document_ids(cu_seqlens: torch.Tensor | list[int], total: int, device=None) -> torch.Tensor:
    """Per-token document index [total] (int32) from ``cu_seqlens``."""
    lengths = torch.tensor(document_lengths(cu_seqlens, total), device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device, dtype=torch.int32), lengths)


def document_mask(cu_seqlens, total: int, window: int | None, device=None, q_start: int = 0,
                  kv_start: int = 0, q_len: int | None = None) -> torch.Tensor:
    """Dense boolean [Lq, Lk] mask, True where query i may attend key j: same document,
    causal and, with a window, ``i - W < j`` (global positions). By default queries and
    keys are the whole ``[0, total)``; ``q_start``/``q_len`` and ``kv_start`` (keys run
    to the queries' end) cut a block of it. The dense reference and the fallback path."""
    ids = document_ids(cu_seqlens, total, device)
    q_len = total - q_start if q_len is None else q_len
    qi = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    kj = torch.arange(kv_start, q_start + q_len, device=device)[None, :]
    visible = (ids[qi] == ids[kj]) & (kj <= qi)
    if window is not None:
        visible &= kj > qi - window
    return visible


def document_mask_mod(ids: torch.Tensor, window: int | None, q_start: int = 0, kv_start: int = 0):
    """FlexAttention mask_mod: same document (``ids`` per global token), causal, and within
    the window on sliding layers (torchtitan composes document and window masks the same
    way). Query index ``q_idx`` is global position ``q_start + q_idx``, key ``kv_idx``
    position ``kv_start + kv_idx``."""

    def mask_mod(b, h, q_idx, kv_idx):
        qp, kp = q_idx + q_start, kv_idx + kv_start
        visible = (ids[qp] == ids[kp]) & (kp <= qp)
        if window is not None:
            visible = visible & (kp > qp - window)
        return visible

    return mask_mod


def document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens, window: int | None = None,
    scale: float | None = None, q_start: int | None = None,
) -> torch.Tensor:
    """Causal (``window=None``) or sliding-window attention within documents.

    Key j is visible to query i iff both lie in the same document and ``j <= i`` (and, with
    a window, ``i - W < j``: the band's lower bound is ``max(i - W + 1, start of i's
    document)``). Documents come as Megatron's ``cu_seqlens`` ([0, e_1, ..., L]): that is
    what ``GPTDataset(inter_document_masking=True)`` yields and what THD
    ``PackedSeqParams`` carry, it is O(documents) rather than O(L), and the CPU path needs
    the boundaries themselves (it cuts the sequence at them), not per-token ids, which
    :func:`document_ids` derives where a mask needs them.

    Args:
        q: [1, Hq, Lq, D]; k, v: [1, Hkv, Lk, D], Lk >= Lq. The batch is one packed
            sequence, as in Megatron's THD format (pack a batch by concatenating its rows
            and offsetting their boundaries).
        cu_seqlens: document boundaries of the whole sequence, int tensor or list.
        window: W keys per query (sliding layer) or None (global causal layer).
        q_start: global position of the first query (default ``Lk - Lq``); the keys are
            positions ``[q_start + Lq - Lk, q_start + Lq)`` (queries aligned to the end of
            the keys, as for a context-parallel chunk after its halo or gathered keys).
    Returns: [1, Hq, Lq, D].

    CPU (native kernel and pure-torch path alike): each document's queries run against
    that document's keys as a sequence of their own through :func:`sliding_window_attention`
    / :func:`causal_attention`: no key of another document is ever visited, so a global
    layer costs sum(d_i^2) and a sliding one sum(d_i * min(d_i, W)). ``torch.split``'s
    backward is one concatenation, so cutting costs no full-length zero buffers. CUDA with
    FlexAttention: one call with a document-aware block mask (the block mask skips whole
    off-document tiles). Other devices: SDPA with a dense mask.
    """
    if q.shape[0] != 1:
        raise ValueError(f"document masking takes one packed sequence (batch 1, THD), got batch {q.shape[0]}")
    q_len, kv_len = q.shape[2], k.shape[2]
    if kv_len < q_len:
        raise ValueError(f"keys ({kv_len}) must cover the queries ({q_len})")
    q_start = kv_len - q_len if q_start is None else q_start
    kv_start, q_end = q_start + q_len - kv_len, q_start + q_len
    if kv_start < 0:
        raise ValueError(f"keys would start at position {kv_start} < 0")
    bounds = [int(x) for x in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)]
    document_lengths(bounds, bounds[-1] if bounds else 0)  # validates
    if q_end > bounds[-1]:
        raise ValueError(f"cu_seqlens ends at {bounds[-1]}, before the queries' end {q_end}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    if q.device.type == "cpu" or not flex_attention_available(q.device):
        if q.device.type != "cpu":
            _warn_dense_fallback(q.device.type)
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
            mask = document_mask(bounds, bounds[-1], window, q.device, q_start, kv_start, q_len)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        # Each document meeting the queries: its queries [qs, qe) against its keys
        # [ks, qe). The key pieces tile [kv_start, q_end) after one unused lead (keys of
        # an earlier document, e.g. gathered rows before the first query's document).
        q_lengths, k_lengths = [], []
        for a, b in zip(bounds, bounds[1:]):
            qs, qe = max(a, q_start), min(b, q_end)
            if qs >= qe:
                continue
            ks = max(a, kv_start)
            if not k_lengths:
                k_lengths.append(ks - kv_start)
            q_lengths.append(qe - qs)
            k_lengths.append(qe - ks)
        # GQA: repeat K/V once for the whole pack, not once per document (one backward sum)
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        q_parts = q.split(q_lengths, dim=2)
        k_parts, v_parts = (x.split(k_lengths, dim=2)[1:] for x in (k, v))
        outs = []
        for dq, dk, dv in zip(q_parts, k_parts, v_parts):
            if window is None:
                outs.append(causal_attention(dq, dk, dv, scale))
            else:
                outs.append(sliding_window_attention(dq, dk, dv, window, scale))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    from torch.nn.attention.flex_attention import create_block_mask

    ids = document_ids(bounds, bounds[-1], q.device)
    mask = create_block_mask(document_mask_mod(ids, window, q_start, kv_start), B=None, H=None,
                             Q_LEN=q_len, KV_LEN=kv_len, device=str(q.device))
    return _compiled_flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=groups > 1)
