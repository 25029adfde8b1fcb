"""The CPU compat layer: active only without CUDA, scoped to Megatron's modules,
reversible, and enough for Megatron's own CUDA-placing code to run."""

import importlib

import pytest
import torch

from rnope_megatron.compat import cpu as cpu_compat
from rnope_megatron.compat import megatron_import


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


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="exercises the CPU-only path")
def test_megatrons_fusions_compile_at_their_first_call_on_cpu():
    """The package imported Megatron (rnope_megatron/__init__.py) with its jit_fuser
    deferring torch.compile; torch.compile itself is torch's again for everyone else."""
    from megatron.core import jit
    from megatron.core.fusions import fused_bias_geglu

    assert jit.jit_fuser is megatron_import.compile_on_first_call
    assert fused_bias_geglu.geglu.compile_deferred and fused_bias_geglu.geglu.__name__ == "geglu"
    assert torch.compile is megatron_import._real_compile


def test_compile_on_first_call_makes_the_same_compile_call_once():
    calls = []

    def recording_compile(function, **settings):
        calls.append((function, settings))
        return lambda x: function(x) * 10

    def double(x):
        return 2 * x

    deferred = megatron_import.compile_on_first_call(double, real_compile=recording_compile, mode="max-autotune")
    assert calls == [] and deferred.__name__ == "double"  # decorating compiles nothing
    assert deferred(3) == 60 and deferred(4) == 80
    assert calls == [(double, {"mode": "max-autotune"})]  # once, with the decorator's settings
    as_decorator = megatron_import.compile_on_first_call(real_compile=recording_compile, dynamic=False)(double)
    assert as_decorator(1) == 20 and calls[-1] == (double, {"dynamic": False})
    module = torch.nn.Linear(2, 2)
    megatron_import.compile_on_first_call(module, real_compile=recording_compile)
    assert calls[-1] == (module, {})  # not a plain function: compiled at once, as torch.compile would


def test_compile_on_first_call_returns_what_torch_compile_computes():
    """Through torch.compile itself (its eager backend: no C++ toolchain needed)."""
    def gelu_tanh(x):
        return torch.nn.functional.gelu(x, approximate="tanh") * x

    x = torch.randn(5, 7)
    deferred = megatron_import.compile_on_first_call(gelu_tanh, backend="eager")
    assert torch.equal(deferred(x), torch.compile(gelu_tanh, backend="eager")(x))
    assert torch.equal(deferred(x), gelu_tanh(x))


def test_compile_is_deferred_only_without_cuda_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with megatron_import.compile_deferred_on_cpu() as deferring:
        assert not deferring and torch.compile is megatron_import._real_compile
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with megatron_import.compile_deferred_on_cpu() as deferring:
        assert deferring and torch.compile is megatron_import.compile_on_first_call
    assert torch.compile is megatron_import._real_compile
    with pytest.raises(KeyError), megatron_import.compile_deferred_on_cpu():
        raise KeyError("an import that fails")
    assert torch.compile is megatron_import._real_compile  # restored on the way out of a failure too
