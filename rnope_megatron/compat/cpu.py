"""Let Megatron-Core's real training path run on a CPU-only machine under gloo.

Megatron-Core hard-codes CUDA in a few modules (``device="cuda"`` factories,
``torch.cuda.current_device()``, streams, events, ``synchronize``). On a machine without
CUDA, :func:`enable` replaces the ``torch`` name *inside those modules only* with a proxy
that places tensors on the CPU and turns stream/event/synchronize calls into no-ops. The
global ``torch`` is untouched, and :func:`enable` refuses to do anything when CUDA is
available: on GPU Megatron runs unmodified.

Two Tensor *methods* cannot be scoped through a module's ``torch``, so they are replaced
process-wide but behave differently only for callers in ``megatron.core`` (checked on the
caller's frame): ``Tensor.cuda()`` returns the tensor unchanged, and ``Tensor.type()``
reports CUDA type names (Megatron's optimizers assert on them). Other callers see the
original methods.

The RNG tracker (``tensor_parallel.random``) gets a CPU-generator tracker via
:func:`seed_model_parallel_rng`, the CPU counterpart of
``model_parallel_cuda_manual_seed``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types

import torch

# Megatron modules whose module-level ``torch`` is proxied: the ones that placed tensors
# on CUDA or called CUDA streams/events/synchronize when Megatron's training path
# (schedules, DDP, optimizer, dist-checkpointing, rotary, attention) ran on a CUDA-less
# machine. tests/test_compat.py and the trainer tests exercise each.
SCOPED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.module",
    "megatron.core.utils",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.utils",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
)

# Modules of optional packages with the same CUDA calls, scoped once imported (they are
# not imported here: modelopt takes ~20 s to import). modelopt's Megatron plugin calls
# torch.cuda.synchronize() in every quantized module's get_extra_state (checkpoint saves).
OPTIONAL_SCOPED_MODULES = (
    "modelopt.torch.opt.plugins.megatron",
)

_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "as_tensor", "empty_strided",
    "empty_like", "zeros_like", "ones_like", "full_like", "rand", "randn", "randint",
)

_original_torch: dict[str, object] = {}
_original_tensor_cuda = torch.Tensor.cuda
_original_tensor_type = torch.Tensor.type


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _on_cpu(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return wrapper


class _NullStream:
    """Stands in for a CUDA stream: CPU work is already ordered."""

    def wait_stream(self, *_a, **_k):
        pass

    def wait_event(self, *_a, **_k):
        pass

    def record_event(self, *_a, **_k):
        return _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullEvent(_NullStream):
    """Stands in for a CUDA event."""

    def __init__(self, *_a, **_k):
        pass

    def record(self, *_a, **_k):
        pass

    def wait(self, *_a, **_k):
        pass

    def elapsed_time(self, _other):
        return 0.0


def _noop(*_a, **_k):
    return None


class _CpuCuda(types.SimpleNamespace):
    """``torch.cuda`` as the scoped modules see it on a CPU-only machine."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


_CPU_CUDA = _CpuCuda(
    current_device=lambda: "cpu",
    is_available=lambda: False,
    device_count=lambda: 0,
    set_device=_noop,
    synchronize=_noop,
    empty_cache=_noop,
    current_stream=lambda *_a, **_k: _NullStream(),
    default_stream=lambda *_a, **_k: _NullStream(),
    Stream=lambda *_a, **_k: _NullStream(),
    stream=lambda *_a, **_k: contextlib.nullcontext(),
    Event=_NullEvent,
    FloatTensor=torch.FloatTensor,
    HalfTensor=torch.HalfTensor,
    BFloat16Tensor=torch.BFloat16Tensor,
)


class _CpuTorch(types.ModuleType):
    """``torch`` as the scoped modules see it: CUDA placements land on the CPU."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CPU_CUDA
        for name in _FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _called_from_megatron(depth: int = 2) -> bool:
    return sys._getframe(depth).f_globals.get("__name__", "").startswith("megatron.core")


def _tensor_cuda_from_megatron_stays_on_cpu(self, *args, **kwargs):
    """``Tensor.cuda`` is a method, so it cannot be scoped through a module's ``torch``:
    calls made from megatron.core code return the tensor unchanged, any other caller
    gets the real method (which raises on this CUDA-less machine, as it should)."""
    if _called_from_megatron():
        return self
    return _original_tensor_cuda(self, *args, **kwargs)


def _tensor_type_seen_by_megatron(self, *args, **kwargs):
    """Megatron's optimizers check ``param.type() == 'torch.cuda.FloatTensor'``; for its
    callers a CPU tensor reports the CUDA type name of its dtype."""
    name = _original_tensor_type(self, *args, **kwargs)
    if not args and not kwargs and _called_from_megatron() and name.startswith("torch.") and ".cuda." not in name:
        return name.replace("torch.", "torch.cuda.", 1)
    return name


def cuda_available() -> bool:
    return torch.cuda.is_available()


def is_active() -> bool:
    return bool(_original_torch)


def enable() -> bool:
    """Install the CPU redirect if (and only if) CUDA is unavailable. Returns whether it
    is active. Idempotent."""
    if cuda_available():
        return False
    if _original_torch:
        return True
    proxy = _CpuTorch()
    torch.Tensor.cuda = _tensor_cuda_from_megatron_stays_on_cpu
    torch.Tensor.type = _tensor_type_seen_by_megatron
    for name in SCOPED_MODULES:
        _scope(name, proxy)
    scope_optional_modules(proxy)
    return True


def _scope(name: str, proxy) -> None:
    module = importlib.import_module(name)
    _original_torch[name] = module.torch
    module.torch = proxy


def scope_optional_modules(proxy=None) -> None:
    """Scope the :data:`OPTIONAL_SCOPED_MODULES` imported so far (when the redirect is
    active): call after importing an optional package, e.g. modelopt."""
    if not _original_torch:
        return
    proxy = proxy or _CpuTorch()
    for name in OPTIONAL_SCOPED_MODULES:
        if name in sys.modules and name not in _original_torch:
            _scope(name, proxy)


def disable() -> None:
    """Undo :func:`enable` (tests use this)."""
    for name, original in _original_torch.items():
        importlib.import_module(name).torch = original
    _original_torch.clear()
    torch.Tensor.cuda = _original_tensor_cuda
    torch.Tensor.type = _original_tensor_type


def _cpu_tracker_class():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        """Megatron's RNG tracker over CPU generator states (dropout in TP regions)."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise ValueError(f"seed {seed} already exists")
            if name in self.states_:
                raise ValueError(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise KeyError(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


def seed_model_parallel_rng(seed: int) -> None:
    """Seed torch and Megatron's model-parallel RNG tracker for this rank.

    GPU: Megatron's ``model_parallel_cuda_manual_seed``. CPU: the same named states
    (data-parallel, tensor-parallel with the TP rank offset, expert) on CPU generators."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    torch.manual_seed(seed)
    if cuda_available():
        mp_random.model_parallel_cuda_manual_seed(seed)
        return
    tracker = _cpu_tracker_class()()
    mp_random._CUDA_RNG_STATE_TRACKER = tracker
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
