"""Context parallelism on the portable backend, proven on CPU under gloo.

* The kernels with queries at the end of longer keys (a halo, or gathered earlier chunks)
  against the float64 dense oracle run on the whole square sequence (last rows taken).
* The whole model at CP=2, CP=4 and CP=2 x TP=2 against one process: loss, logits and
  every parameter gradient, for windows crossing chunk boundaries, windows longer than a
  chunk (halos from several ranks), W=1, and all three letters. Tolerance 1e-5 absolute
  (fp32; only reduction order differs).
* Memory per rank, whole model at CP=2 (the CPU allocator's peak), against CP=1 and
  against rnope-plan's estimate.
* What travels: a sliding layer's halo exchange sends the same bytes whatever the sequence
  length (O(W·D)), a global layer's all-gather grows with it; both reproduce the dense
  float64 oracle's attention and gradients.

float64 tolerances: 1e-12 on the native kernel; 1e-6 where torch's CPU flash kernel runs
(its ~20-bit exp: the pure-torch sliding path and global layers, measured ~1e-7).
"""

import functools
import pathlib
import sys
import unittest.mock

import pytest
import torch

from rnope_megatron.attention import native_cpu
from rnope_megatron.attention.context_parallel import ZigZag, halo_sources
from rnope_megatron.attention.rotary import frequency_table, zigzag_rows
from rnope_megatron.attention.sliding_window import causal_attention, sliding_window_attention
from tests import workers
from tests.support import dense_attention, free_port, run_distributed
from tests.test_distributed import assemble
from tests.workers import context_parallel_traffic, forward_backward

TOL = dict(atol=1e-5, rtol=0)


@pytest.fixture(params=["native", "sdpa"])
def cpu_kernel(request, monkeypatch):
    monkeypatch.setenv("RNOPE_SWA_CPU_KERNEL", request.param)
    return request.param


def _with_leading_queries(q_len, k_len, heads=4, groups=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q_full = torch.randn(2, heads, k_len, dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, groups, k_len, dim, generator=g, dtype=torch.float64) for _ in range(2))
    grad = torch.randn(2, heads, q_len, dim, generator=g, dtype=torch.float64)
    return q_full, k, v, grad


def _oracle(q_full, k, v, window, grad, q_len):
    """Dense attention over the whole square sequence; the last q_len rows are the answer."""
    inputs = [x.clone().requires_grad_() for x in (q_full, k, v)]
    out = dense_attention(*inputs, window)[:, :, -q_len:]
    grads = torch.autograd.grad(out, inputs, grad)
    return out.detach(), grads[0][:, :, -q_len:], grads[1], grads[2]


@pytest.mark.parametrize("q_len, k_len, window", [
    (20, 27, 8),    # a full halo of W-1 keys
    (37, 40, 7),    # a short halo (a chunk near the sequence start)
    (5, 12, 8),     # chunk shorter than the window
    (64, 79, 16),   # several query blocks after the halo
    (30, 40, 5),    # keys beyond the window's reach (dropped)
    (12, 17, 1),    # W = 1
])
def test_sliding_window_with_a_halo_matches_the_dense_oracle(cpu_kernel, q_len, k_len, window):
    q_full, k, v, grad = _with_leading_queries(q_len, k_len)
    expected = _oracle(q_full, k, v, window, grad, q_len)
    inputs = [q_full[:, :, -q_len:].clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_()]
    out = sliding_window_attention(*inputs, window)
    grads = torch.autograd.grad(out, inputs, grad, allow_unused=True)  # W=1: q is not used
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    tol = 1e-12 if cpu_kernel == "native" else 1e-6
    for ours, theirs in zip((out, *grads), expected):
        torch.testing.assert_close(ours, theirs, atol=tol, rtol=0)


def test_native_kernel_refuses_keys_no_query_sees():
    native_cpu._load()
    q, k = torch.randn(1, 4, 8), torch.randn(1, 20, 8)
    with pytest.raises(RuntimeError, match="keys precede the queries but the window sees only 3"):
        torch.ops.rnope.sliding_window_cpu_forward(q, k, k, 4, 0.5, 4)


@pytest.mark.parametrize("q_len, k_len", [(10, 40), (16, 17), (1, 9)])
def test_causal_attention_with_earlier_keys_matches_the_dense_oracle(q_len, k_len):
    q_full, k, v, grad = _with_leading_queries(q_len, k_len, seed=1)
    expected = _oracle(q_full, k, v, None, grad, q_len)
    inputs = [q_full[:, :, -q_len:].clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_()]
    out = causal_attention(*inputs)
    grads = torch.autograd.grad(out, inputs, grad)
    for ours, theirs in zip((out, *grads), expected):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_halos_come_from_every_chunk_the_window_reaches():
    """seq 256, CP 4: chunks of 32 tokens; W=100 reaches back over three chunks."""
    assert halo_sources(7, 32, 100) == [(3, 29, 32), (4, 0, 32), (5, 0, 32), (6, 0, 32)]
    assert halo_sources(1, 32, 100) == [(0, 0, 32)]  # at the start: what there is
    assert halo_sources(0, 32, 100) == []
    assert halo_sources(5, 32, 8) == [(4, 25, 32)]  # one neighbour when the chunk is long enough
    zz = ZigZag(size=4, rank=1, chunk=32)
    assert zz.local_chunks == (1, 6) and [zz.owner(c) for c in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]


def test_rope_positions_follow_megatrons_split():
    """The RoPE rows of a CP rank are the positions Megatron's get_batch_on_this_cp_rank
    gives that rank's tokens."""
    from megatron.core.utils import _get_batch_on_this_cp_rank_per_sequence_balancing

    table = frequency_table(8, 10000.0, False, 64, "cpu")
    positions = torch.arange(64)[None]
    for size in (2, 4):
        for rank in range(size):
            with unittest.mock.patch("torch.distributed.get_world_size", return_value=size), \
                    unittest.mock.patch("torch.distributed.get_rank", return_value=rank):
                theirs = _get_batch_on_this_cp_rank_per_sequence_balancing({"p": positions}, object())["p"]
            assert torch.equal(zigzag_rows(table, size, rank), table[theirs[0]])
            assert torch.equal(ZigZag(size, rank, 64 // (2 * size)).local_positions(), theirs[0])


@functools.cache
def _single(model_items):
    return forward_backward(0, 1, free_port(), {}, dict(model_items), IDS)


IDS = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layout, model_kwargs", [
    ({"context": 2}, {"pattern": "SSSG", "window": 8}),                          # windows cross chunks of 10
    ({"context": 2}, {"pattern": "SGRS", "window": 13, "num_query_groups": 1}),  # window > chunk; S, G, R; MQA
    ({"context": 2}, {"pattern": "S", "window": 1}),                              # W = 1
    ({"context": 4}, {"pattern": "SSSR", "window": 8, "tie_embeddings": False}),  # chunks of 5 < W: 2 senders
    ({"context": 2, "tensor": 2}, {"pattern": "SSSG", "window": 8}),              # CP x TP
], ids=["cp2-crossing", "cp2-window-over-chunk-SGR", "cp2-W1", "cp4-multi-rank-halo", "cp2-tp2"])
def test_context_parallel_model_matches_one_process(megatron_single, layout, model_kwargs):
    reference = _single(tuple(sorted(model_kwargs.items())))
    world = layout.get("context", 1) * layout.get("tensor", 1)
    results = run_distributed(forward_backward, world, layout, model_kwargs, IDS)
    for result in results:
        torch.testing.assert_close(result["loss"], reference["loss"], **TOL)
        torch.testing.assert_close(result["logits"], reference["logits"], **TOL)
    # every CP rank holds the summed gradients of the replicated weights
    ours, ref = assemble(results), assemble([reference])
    assert ours.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], **TOL, msg=key)


def _reference_attention(seq, window, heads, dim):
    """The dense float64 oracle on the whole sequence (the worker's inputs, same seed)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(seq, 1, heads, dim, generator=g, dtype=torch.float64) for _ in range(3))
    grad_out = torch.randn(seq, 1, heads, dim, generator=g, dtype=torch.float64)
    inputs = [x.permute(1, 2, 0, 3).clone().requires_grad_() for x in (q, k, v)]
    out = dense_attention(*inputs, window, 0.25)
    grads = torch.autograd.grad(out, inputs, grad_out.permute(1, 2, 0, 3))
    as_tokens = lambda x: x.permute(0, 2, 1, 3)  # noqa: E731  [b, h, s, d] -> [b, s, h, d]
    return as_tokens(out.detach()), [as_tokens(g_) for g_ in grads]


@pytest.mark.parametrize("letter", ["S", "G"])
def test_what_each_layer_kind_sends(letter):
    """S: the halo exchange sends the same bytes at L=256 and L=1024 (O(W·D): at most the
    W-1 rows before each of a rank's two chunks, K and V); G: the all-gather's share grows
    with L (gathered in the forward and again in the backward; the K/V gradients are reduced
to their owners, [2c] rows each). Both give the one-process output and gradients."""
    window, heads, dim = 24, 2, 8
    sent = {}
    for seq in (256, 1024):
        results = run_distributed(context_parallel_traffic, 2, seq, window, heads, dim, letter)
        expected_out, expected_grads = _reference_attention(seq, window if letter == "S" else None, heads, dim)
        tol = 1e-12 if letter == "S" else 1e-6
        for result in results:
            torch.testing.assert_close(result["out"], expected_out, atol=tol, rtol=0)
            for ours, theirs in zip(result["grads"], expected_grads):
                torch.testing.assert_close(ours, theirs, atol=tol, rtol=0)
        sent[seq] = [result["sent"] for result in results]
    row_bytes = heads * 2 * dim * 8  # K and V rows of float64
    if letter == "S":
        for per_rank_short, per_rank_long in zip(sent[256], sent[1024]):
            assert per_rank_short == per_rank_long  # independent of the sequence length
            # forward halo + the same rows' gradients back, at most 2 chunks x (W-1) rows
            assert 0 < per_rank_long["p2p"] <= 2 * 2 * (window - 1) * row_bytes
            assert per_rank_long["all_gather"] == 0
    else:
        for short, long in zip(sent[256], sent[1024]):
            assert short["p2p"] == long["p2p"] == 0
            # the rank's K/V, gathered in the forward and again in the backward (not kept)
            assert long["all_gather"] == 4 * short["all_gather"] == 2 * (1024 // 2) * row_bytes
            # the K/V gradient of the other rank's rows, reduced straight to it: [2c] rows,
            # never a whole-sequence buffer
            assert long["reduce"] == 4 * short["reduce"] == 1024 // 2 * row_bytes


# ------------------------------------------------------------ memory per rank, whole model

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import context_parallel as cp_benchmark  # noqa: E402

# Long enough that the layers' activations make the peak (weights ~0.3 MB, logits ~1.5 MB,
# activations ~180 MB at CP=1), chunks of 1024 tokens > W: every halo comes from one
# neighbour.
MEMORY_SEQ, MEMORY_WINDOW = 4096, 256


@functools.cache
def _peaks() -> dict:
    """{CP: every rank's result} of one whole-model forward+backward (benchmarks/context_parallel.py)."""
    kwargs = cp_benchmark.model_shape(MEMORY_SEQ, MEMORY_WINDOW)
    return {cp: run_distributed(cp_benchmark.model_peak, cp, kwargs, MEMORY_SEQ) for cp in (1, 2)}


def test_whole_model_peak_per_rank_shrinks_with_context_parallelism():
    """Every CP=2 rank's allocator peak (profiler allocation events, not RSS) is at most
    1.25 x (CP=1 peak / 2) + one global layer's gathered K/V; the loss is the one-process
    loss. (docs/context-parallel-memory.md: measured 94.5 / 96.2 MB per rank against a
    bound of 117.6 MB and 92.5 MB for CP=1 / 2.)"""
    peaks = _peaks()
    single = peaks[1][0]["peak"]
    gathered = cp_benchmark.gathered_kv_bytes(cp_benchmark.model_shape(MEMORY_SEQ, MEMORY_WINDOW), MEMORY_SEQ)
    bound = 1.25 * single / 2 + gathered
    for rank, result in enumerate(peaks[2]):
        print(f"rank {rank}: {result['peak'] / 2**20:.1f} MB; CP=1 {single / 2**20:.1f} MB; bound {bound / 2**20:.1f} MB")
        assert result["peak"] <= bound, (rank, result["peak"], single, gathered)
        assert result["loss"] == pytest.approx(peaks[1][0]["loss"], abs=1e-5)


def test_planned_cp_memory_matches_the_measured_peak():
    """rnope-plan's activations + transient + logits + gradients against the same
    measured peaks, CP=1 and CP=2, within the memory model's 8 %."""
    kwargs = cp_benchmark.model_shape(MEMORY_SEQ, MEMORY_WINDOW)
    for cp, results in _peaks().items():
        measured = max(r["peak"] for r in results)
        error = cp_benchmark.plan_estimate(kwargs, MEMORY_SEQ, cp) / measured - 1
        print(f"CP={cp}: plan {error:+.1%} of the measured {measured / 2**20:.1f} MB")
        assert abs(error) <= 0.08, (cp, error)


# ------------------------------------------------------------ document masking under CP

# 80 tokens, W = 8: chunks of 20 (CP=2) and 10 (CP=4). Documents cross chunk boundaries,
# are shorter than a chunk (3, 1, 2) and longer than the window (14, 20, 30); tokens 40
# and 70 start both a chunk and a document (no halo there).
DOC_IDS = torch.randint(0, 96, (1, 80), generator=torch.Generator().manual_seed(2))
DOCUMENTS = [[0, 3, 4, 18, 38, 40, 70, 80]]


@functools.cache
def _single_documents(model_items):
    return forward_backward(0, 1, free_port(), {}, dict(model_items), DOC_IDS, DOCUMENTS)


@pytest.mark.parametrize("layout, model_kwargs", [
    ({"context": 2}, {"pattern": "SSSG", "window": 8}),
    ({"context": 4}, {"pattern": "SGRS", "window": 8, "num_query_groups": 1}),
    ({"context": 2, "tensor": 2}, {"pattern": "SSSG", "window": 8}),
], ids=["cp2", "cp4-SGR", "cp2-tp2"])
def test_context_parallel_documents_match_one_process(megatron_single, layout, model_kwargs):
    """Document masking under CP (sequence-level zig-zag, document-trimmed halos, per-
    document masking after the gather) equals CP=1 with document masking: loss, logits,
    every gradient (CP=1 with documents equals the documents run one at a time:
    tests/test_document_mask.py)."""
    reference = _single_documents(tuple(sorted(model_kwargs.items())))
    plain = forward_backward(0, 1, free_port(), {}, model_kwargs, DOC_IDS)
    assert not torch.allclose(plain["logits"], reference["logits"], atol=1e-3)  # masking matters here
    world = layout.get("context", 1) * layout.get("tensor", 1)
    results = run_distributed(forward_backward, world, layout, model_kwargs, DOC_IDS, DOCUMENTS)
    for result in results:
        torch.testing.assert_close(result["loss"], reference["loss"], **TOL)
        torch.testing.assert_close(result["logits"], reference["logits"], **TOL)
    ours, ref = assemble(results), assemble([reference])
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], **TOL, msg=key)


def test_a_document_boundary_removes_a_halo():
    """CP=2, chunks of 20, W=24, documents [0, 15), [15, 40), [40, 80). Without masking
    each chunk takes the 23 rows before it. With it: chunk 1 (20..39) only rows 15..19
    (its document starts at 15), chunk 2 (40..59) starts a document and takes none, chunk
    3 (60..79) rows 40..59. Bytes are counted on the wire (the halo forward and its
    gradient back): fewer than without masking on every rank, and exactly these rows.
    Output and gradients equal the dense float64 reference with the document mask."""
    from rnope_megatron.attention.sliding_window import document_mask

    seq, window, heads, dim = 80, 24, 2, 8
    documents = [0, 15, 40, 80]
    assert halo_sources(1, 20, window, tuple(documents)) == [(0, 15, 20)]
    assert halo_sources(2, 20, window, tuple(documents)) == []
    assert halo_sources(3, 20, window, tuple(documents)) == [(2, 0, 20)]
    masked = run_distributed(context_parallel_traffic, 2, seq, window, heads, dim, "S", documents)
    plain = run_distributed(context_parallel_traffic, 2, seq, window, heads, dim, "S")
    row_bytes = heads * 2 * dim * 8  # K and V rows of float64
    # rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2. Without masking rank 0 sends
    # 20 rows to chunk 1 and 3 to chunk 2, rank 1 20 + 3 rows to chunk 3; the gradients
    # come back the same way: 46 rows each.
    assert [r["sent"]["p2p"] for r in plain] == [46 * row_bytes] * 2
    # With it: rank 0 sends 5 rows (15..19) and 20 gradient rows back; rank 1 20 rows and
    # 5 gradient rows.
    assert [r["sent"]["p2p"] for r in masked] == [25 * row_bytes] * 2
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(seq, 1, heads, dim, generator=g, dtype=torch.float64) for _ in range(3))
    grad_out = torch.randn(seq, 1, heads, dim, generator=g, dtype=torch.float64)
    inputs = [x.permute(1, 2, 0, 3).clone().requires_grad_() for x in (q, k, v)]
    mask = document_mask(documents, seq, window)
    scores = (inputs[0] @ inputs[1].transpose(-1, -2) * 0.25).masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, -1) @ inputs[2]
    grads = torch.autograd.grad(out, inputs, grad_out.permute(1, 2, 0, 3))
    as_tokens = lambda x: x.permute(0, 2, 1, 3)  # noqa: E731
    for result in masked:
        torch.testing.assert_close(result["out"], as_tokens(out.detach()), atol=1e-12, rtol=0)
        for ours, theirs in zip(result["grads"], grads):
            torch.testing.assert_close(ours, as_tokens(theirs), atol=1e-12, rtol=0)


def test_the_gathered_sequence_path_of_other_devices_agrees_with_the_blockwise_one():
    """CUDA runs global layers through the gathered sequence in token order; on CPU
    both paths run, on CP=2 ranks of a GQA layer (float64: the flash kernel's exp)."""
    for blockwise, sequence in run_distributed(workers.global_paths, 2, 48, 4, 2, 8):
        for ours, theirs in zip(blockwise, sequence):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
