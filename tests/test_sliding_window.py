"""Portable attention kernels against a dense float64 masked reference (the oracle).

Both CPU sliding-window paths run every case: the native banded kernel and the
pure-torch blocked-SDPA path (``cpu_kernel`` fixture; each run makes the other path
raise, so a case cannot silently pass through the wrong one).
Tolerances: float64 inputs 1e-6 (torch's CPU flash kernel uses a ~20-bit exp on its
causal path, measured ~1e-7); float32 inputs 2e-5."""

import warnings

import pytest
import torch

from rnope_megatron.attention import sliding_window
from rnope_megatron.attention.sliding_window import (
    causal_attention,
    query_tile,
    sliding_window_attention,
    sliding_window_mask_mod,
)
from tests.support import dense_attention


def _inputs(seq, heads, groups, dim=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(2, h, seq, dim, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(heads), make(groups), make(groups)


@pytest.fixture(params=["native", "sdpa"])
def cpu_kernel(request, monkeypatch):
    """Run the test on one CPU kernel; the other one raises if reached."""
    monkeypatch.setenv("RNOPE_SWA_CPU_KERNEL", request.param)

    def unexpected(*args, **kwargs):
        raise AssertionError(f"RNOPE_SWA_CPU_KERNEL={request.param} took the other path")

    if request.param == "native":
        monkeypatch.setattr(sliding_window._BlockedSlidingWindowCPU, "apply", unexpected)
    else:
        monkeypatch.setattr(sliding_window, "sliding_window_cpu", unexpected)
    return request.param


def _grads(out, inputs, grad_out):
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


# Window edges: L = W-1, W, W+1; L not a multiple of W or of the query tile; GQA ratios;
# W = 1 (only the current token) and W = 2; long enough for several tiles.
CASES = [
    # seq, window, heads, groups
    (15, 16, 2, 2),
    (16, 16, 2, 2),
    (17, 16, 2, 2),
    (37, 8, 4, 2),
    (40, 7, 4, 1),
    (64, 16, 4, 4),
    (33, 1, 2, 1),
    (33, 2, 2, 2),
    (300, 24, 4, 2),
    (1000, 400, 2, 1),  # tile 192 < W: several body tiles and a padded tail
]


@pytest.mark.parametrize("seq, window, heads, groups", CASES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 2e-5)])
def test_matches_dense_reference_forward_and_gradients(seq, window, heads, groups, dtype, tol, cpu_kernel):
    q, k, v = _inputs(seq, heads, groups, dtype=dtype)
    out = sliding_window_attention(q, k, v, window)
    ref_inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = dense_attention(*ref_inputs, window)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for ours, theirs in zip(_grads(out, (q, k, v), grad_out.to(dtype)), _grads(ref, ref_inputs, grad_out)):
        torch.testing.assert_close(ours.double(), theirs, atol=tol * 5, rtol=0)


def test_window_actually_restricts(cpu_kernel):
    """Changing a key outside every window leaves outputs unchanged; inside changes them."""
    q, k, v = (x.detach() for x in _inputs(64, 2, 2))
    base = sliding_window_attention(q, k, v, 8)
    k2 = k.clone()
    k2[:, :, 10] += 5.0  # key 10 is seen by queries 10..17 only
    out = sliding_window_attention(q, k2, v, 8)
    changed = (out - base).abs().amax(dim=(0, 1, 3)) > 1e-9
    assert changed.nonzero().flatten().tolist() == list(range(10, 18))


def test_global_causal_matches_reference():
    q, k, v = _inputs(50, 4, 2)
    torch.testing.assert_close(causal_attention(q, k, v), dense_attention(q, k, v, None), atol=1e-6, rtol=0)


def test_bf16_runs_and_is_close():
    q, k, v = _inputs(130, 4, 2, dtype=torch.bfloat16)
    out = sliding_window_attention(q, k, v, 32)
    ref = dense_attention(q, k, v, 32)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=0)
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_query_tile_is_below_window():
    for window in (2, 3, 8, 100, 512, 1024, 4096, 131072):
        assert 1 <= query_tile(window) < window


def test_invalid_window():
    q, k, v = _inputs(8, 2, 2)
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention(q, k, v, 0)


def test_flex_mask_mod_forward_matches_reference():
    """The CUDA path's mask_mod, run through FlexAttention's eager (CPU, forward) path."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = (x.detach().float() for x in _inputs(40, 2, 2))
    mask = flex.create_block_mask(sliding_window_mask_mod(8), B=None, H=None, Q_LEN=40, KV_LEN=40, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex.flex_attention(q, k, v, block_mask=mask)
    torch.testing.assert_close(out.double(), dense_attention(q, k, v, 8), atol=2e-5, rtol=0)
