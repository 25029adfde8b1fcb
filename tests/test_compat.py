"""The CPU compat layer: active only without CUDA, scoped to Megatron's modules,
reversible, and enough for Megatron's own CUDA-placing code to run."""

import importlib

import pytest
import torch

from rnope_megatron.compat import cpu as cpu_compat


@pytest.fixture
def compat_off():
    """Run a test with the redirect removed, then restore the suite's state."""
    was_active = cpu_compat.is_active()
    cpu_compat.disable()
    yield
    if was_active:
        cpu_compat.enable()


def test_never_active_when_cuda_is_available(compat_off, monkeypatch):
    monkeypatch.setattr(cpu_compat, "cuda_available", lambda: True)
    assert cpu_compat.enable() is False
    assert not cpu_compat.is_active()
    for name in cpu_compat.SCOPED_MODULES:
        assert importlib.import_module(name).torch is torch
    assert torch.Tensor.cuda is cpu_compat._original_tensor_cuda


@pytest.mark.skipif(torch.cuda.is_available(), reason="exercises the CPU-only path")
def test_redirect_is_scoped_and_reversible(compat_off):
    mappings = importlib.import_module("megatron.core.tensor_parallel.mappings")
    assert cpu_compat.enable() is True
    assert cpu_compat.enable() is True  # idempotent
    scoped = mappings.torch
    assert scoped is not torch and scoped.cuda.current_device() == "cpu"
    assert scoped.empty(3, device="cuda").device.type == "cpu"
    assert scoped.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert scoped.Tensor is torch.Tensor and scoped.float32 is torch.float32
    with scoped.cuda.stream(scoped.cuda.Stream()):
        scoped.cuda.current_stream().wait_stream(None)
    scoped.cuda.synchronize()
    # outside Megatron nothing changed: the global torch.cuda still has no device
    with pytest.raises((RuntimeError, AssertionError)):
        torch.cuda.current_device()
    with pytest.raises((RuntimeError, AssertionError)):
        torch.ones(1).cuda()  # called from here, not from megatron.core
    cpu_compat.disable()
    assert mappings.torch is torch and not cpu_compat.is_active()
    assert torch.Tensor.cuda is cpu_compat._original_tensor_cuda


@pytest.mark.skipif(torch.cuda.is_available(), reason="exercises the CPU-only path")
def test_megatron_tensor_cuda_calls_stay_on_cpu(compat_off):
    cpu_compat.enable()
    namespace = {"__name__": "megatron.core.fake_module"}
    exec("def move(t):\n    return t.cuda()", namespace)
    t = torch.ones(2)
    assert namespace["move"](t) is t


def test_cpu_rng_tracker_forks_like_megatron(megatron_single):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    cpu_compat.seed_model_parallel_rng(42)
    tracker = get_cuda_rng_tracker()
    outer_before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer_before)  # outer stream untouched
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the forked stream advances
    cpu_compat.seed_model_parallel_rng(42)
    with get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), a)  # and is reproducible from the seed


@pytest.mark.skipif(torch.cuda.is_available(), reason="exercises the CPU-only path")
def test_megatron_sees_cuda_type_names_others_do_not(compat_off):
    cpu_compat.enable()
    namespace = {"__name__": "megatron.core.optimizer.fake"}
    exec("def kind(t):\n    return t.type()", namespace)
    assert namespace["kind"](torch.ones(1)) == "torch.cuda.FloatTensor"
    assert namespace["kind"](torch.ones(1, dtype=torch.bfloat16)) == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type() == "torch.FloatTensor"  # everyone else: the truth
    assert torch.ones(1).type(torch.float64).dtype == torch.float64  # conversions untouched
