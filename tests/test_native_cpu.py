"""The native CPU sliding-window kernel against the dense float64 reference (odd block
sizes, head-dim tails, segmented backward, forced work stealing, any thread count), and its
build / cache / selection rules."""

import math
import os
import subprocess
import sys

import pytest
import torch

from rnope_megatron.attention import native_cpu
from rnope_megatron.attention.sliding_window import sliding_window_attention
from tests.support import dense_attention


@pytest.fixture
def fresh_load():
    """Forget whether this process loaded the kernel, before and after the test."""
    native_cpu._load.cache_clear()
    yield
    native_cpu._load.cache_clear()


@pytest.fixture
def poisoned_empty():
    """Uninitialised tensors (at::empty) come back NaN-filled, so an output or gradient
    element the kernel never writes shows up (dk/dv are not zero-filled: the first block
    to reach a key stores, later ones add)."""
    before = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.utils.deterministic.fill_uninitialized_memory = before[1]


# Query blocks: 1 row, rows not a multiple of the 4-row group, a block wider than the
# window, the default. Head dims: below one tile (8), a tile tail (20), whole tiles (32).
# Windows: 1, below and above a 16-column tile, and one covering the whole sequence.
@pytest.mark.parametrize("block_q", [1, 3, 7, 64])
@pytest.mark.parametrize("seq, window, dim", [(50, 9, 8), (37, 1, 20), (20, 30, 32), (90, 23, 16)])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_kernel_matches_reference_for_any_block_and_head_dim(block_q, seq, window, dim, dtype, tol, monkeypatch,
                                                            poisoned_empty):
    monkeypatch.setattr(native_cpu, "block_rows", lambda w: block_q)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, seq, dim, generator=g, dtype=torch.float64) for _ in range(3))
    grad_out = torch.randn(2, 3, seq, dim, generator=g, dtype=torch.float64)
    scale = 1 / math.sqrt(dim)
    ours_in = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    out = native_cpu.sliding_window_cpu(*ours_in, window, scale)
    ref = dense_attention(*ref_in, window, scale)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)
    ours = torch.autograd.grad(out, ours_in, grad_out.to(dtype))
    theirs = torch.autograd.grad(ref, ref_in, grad_out)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b, atol=tol * 5, rtol=0)


def test_operator_rejects_bad_inputs():
    native_cpu._load()
    q = torch.randn(2, 8, 4)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.rnope.sliding_window_cpu_forward(q.transpose(0, 1), q.transpose(0, 1), q.transpose(0, 1), 3, 0.5, 4)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        h = q.half()
        torch.ops.rnope.sliding_window_cpu_forward(h, h, h, 3, 0.5, 4)
    with pytest.raises(RuntimeError, match="scale must be positive"):
        torch.ops.rnope.sliding_window_cpu_forward(q, q, q, 3, -1.0, 4)
    with pytest.raises(RuntimeError, match="one shape"):
        torch.ops.rnope.sliding_window_cpu_forward(q, q[:1], q[:1], 3, 0.5, 4)


def test_choice_is_validated(monkeypatch):
    monkeypatch.setenv("RNOPE_SWA_CPU_KERNEL", "fast")
    with pytest.raises(ValueError, match="RNOPE_SWA_CPU_KERNEL"):
        native_cpu.kernel_choice()
    monkeypatch.setenv("RNOPE_SWA_CPU_KERNEL", "sdpa")
    assert not native_cpu.native_kernel_usable(torch.float32)
    monkeypatch.setenv("RNOPE_SWA_CPU_KERNEL", "native")
    with pytest.raises(ValueError, match="bfloat16"):
        native_cpu.native_kernel_usable(torch.bfloat16)
    monkeypatch.setenv("RNOPE_SWA_CPU_KERNEL", "auto")
    assert not native_cpu.native_kernel_usable(torch.bfloat16)  # bf16 takes the SDPA path


def test_cache_key_follows_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("RNOPE_KERNEL_CACHE", str(tmp_path))
    first = native_cpu.library_path()
    edited = tmp_path / "edited.cpp"
    edited.write_text(native_cpu.SOURCE.read_text() + "\n// edited\n")
    monkeypatch.setattr(native_cpu, "SOURCE", edited)
    assert native_cpu.library_path() != first and native_cpu.library_path().parent == tmp_path


def test_compile_error_is_reported_with_the_compiler_log(tmp_path, monkeypatch):
    broken = tmp_path / "broken.cpp"
    broken.write_text("int main( {\n")
    monkeypatch.setattr(native_cpu, "SOURCE", broken)
    monkeypatch.setenv("RNOPE_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(native_cpu.KernelBuildError, match=r"broken\.cpp failed[\s\S]*error"):
        native_cpu.build()
    assert not list((tmp_path / "cache").glob("*.so")) and not list((tmp_path / "cache").glob("*.tmp"))


def test_missing_compiler_falls_back_under_auto_and_fails_under_native(tmp_path, monkeypatch, fresh_load):
    monkeypatch.setenv("RNOPE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("RNOPE_SWA_CPU_KERNEL", "auto")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64) for _ in range(3))
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        out = sliding_window_attention(q, k, v, 6)
    torch.testing.assert_close(out, dense_attention(q, k, v, 6, 1 / math.sqrt(8)), atol=1e-6, rtol=0)
    native_cpu._load.cache_clear()
    monkeypatch.setenv("RNOPE_SWA_CPU_KERNEL", "native")
    with pytest.raises(native_cpu.KernelBuildError, match="no C\\+\\+ compiler"):
        sliding_window_attention(q, k, v, 6)


BUILD_IN_CHILD = """
import torch
from rnope_megatron.attention import native_cpu
path = native_cpu.build()
torch.ops.load_library(str(path))
x = torch.randn(1, 5, 4)
out, lse = torch.ops.rnope.sliding_window_cpu_forward(x, x, x, 2, 0.5, 2)
assert torch.isfinite(out).all() and out.shape == x.shape
print(path)
"""


def test_concurrent_first_builds_share_one_library(tmp_path):
    """Two processes (as under torchrun) building into an empty cache: one compiles, the
    other waits on the lock; both get the same, loadable library and no temp files remain."""
    env = {**os.environ, "RNOPE_KERNEL_CACHE": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", BUILD_IN_CHILD], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
    paths = {r[0].strip() for r in results}
    assert len(paths) == 1
    compiled_notices = sum("compiling" in r[1] for r in results)
    assert compiled_notices == 1, [r[1] for r in results]
    assert [p.name for p in tmp_path.glob("*.so")] == [next(iter(paths)).split("/")[-1]]
    assert not list(tmp_path.glob("*.tmp"))


def test_results_do_not_depend_on_the_thread_count():
    """Bit-identical outputs and gradients with 1 and 2 intra-op threads (resume-exactness
    of training relies on it)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 300, 32, generator=g) for _ in range(3))

    def run():
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = native_cpu.sliding_window_cpu(*inputs, 40, 0.2)
        out.backward(torch.ones_like(out))
        return [out.detach()] + [x.grad for x in inputs]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(2)
        double = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, double):
        assert torch.equal(a, b)


def test_forced_work_stealing_changes_no_bit(monkeypatch):
    """Threads steal work when another lags (a loaded machine): with every item given to
    thread 0's range, the other threads' whole share is stolen, forward and backward.
    Results stay bit-identical to one thread and match the float64 reference."""
    g = torch.Generator().manual_seed(7)
    q, k, v, grad_out = (torch.randn(1, 4, 700, 16, generator=g, dtype=torch.float64) for _ in range(4))

    def run():
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = native_cpu.sliding_window_cpu(*inputs, 50, 0.25)
        return [out.detach(), *torch.autograd.grad(out, inputs, grad_out)]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
        monkeypatch.setenv("RNOPE_SWA_FORCE_STEALS", "1")
        before = native_cpu.stolen_items()
        stolen = []
        for n in (2, 3):
            torch.set_num_threads(n)
            stolen.append(run())
        assert native_cpu.stolen_items() > before  # the stealing path did run
    finally:
        torch.set_num_threads(threads)
    for result in stolen:
        assert all(torch.equal(a, b) for a, b in zip(single, result))
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out = dense_attention(*ref_in, 50, 0.25)
    torch.testing.assert_close(single[0], ref_out.detach(), atol=1e-12, rtol=0)
    for ours, theirs in zip(single[1:], torch.autograd.grad(ref_out, ref_in, grad_out)):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)


# Batch·head 1 or 3 asks for many backward segments per head (the kernel aims at ~32
# work items); at L = 333 these windows give 8, 4 and 2 segments (segment_rows in the
# kernel), with blocks of 3, 7 and 64 rows, so segment starts fall off the 4-key groups.
@pytest.mark.parametrize("window, block_q", [(7, 3), (20, 7), (33, 64)])
@pytest.mark.parametrize("heads", [1, 3])
def test_segmented_backward_matches_reference_for_any_thread_count(window, block_q, heads, monkeypatch,
                                                                   poisoned_empty):
    """The backward splits each head into segments that run on different threads (even
    segments first, then odd ones adding into the rows their neighbours stored): gradients
    match the dense float64 reference and are bit-identical with 1, 2 and 3 threads."""
    monkeypatch.setattr(native_cpu, "block_rows", lambda w: block_q)
    g = torch.Generator().manual_seed(11)
    q, k, v, grad_out = (torch.randn(1, heads, 333, 8, generator=g, dtype=torch.float64) for _ in range(4))
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    theirs = torch.autograd.grad(dense_attention(*ref_in, window, 0.3), ref_in, grad_out)
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            ours_in = [x.clone().requires_grad_() for x in (q, k, v)]
            out = native_cpu.sliding_window_cpu(*ours_in, window, 0.3)
            results.append([out.detach(), *torch.autograd.grad(out, ours_in, grad_out)])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(results[0][1:], theirs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
