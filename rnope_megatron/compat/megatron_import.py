"""Import Megatron-Core without setting up torch.compile for fusions a CPU never runs.

``megatron.core.jit`` sets ``jit_fuser = torch.compile`` when it is imported, and a dozen
Megatron modules decorate their fused bias/activation/dropout functions with it at import.
torch.compile compiles nothing until a function's first call, but each decoration builds
TorchDynamo's and Inductor's configuration for it: about 1 s of CPU in every process that
imports Megatron (each console script, each torchrun worker; measured on a 6-iteration
tiny-cpu run: 0.9 s less wall time with the set-up deferred). These are CUDA fusions (``train.fusions``, off without CUDA),
so on a CPU-only machine that setup is never used.

:func:`import_megatron_on_cpu` imports Megatron with ``torch.compile`` standing in, for the
duration of that import and for plain functions only, by :func:`compile_on_first_call`:
it makes the very same ``torch.compile`` call at the function's first call and calls the
result, so a fusion that does run gets what torch.compile would have returned, one call
later. ``megatron.core.jit.jit_fuser`` keeps the stand-in, so Megatron modules imported
later defer theirs too; ``torch.compile`` itself is restored for everyone else.

With a GPU, or when Megatron was already imported, nothing is changed (as for the rest of
:mod:`rnope_megatron.compat`). The GPU check is ``torch.cuda.device_count()``, which asks
NVML and so does not initialise CUDA in this process (``torch.cuda.is_available()``
would, which breaks CUDA in processes forked later)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys

import torch

_real_compile = torch.compile


def compile_on_first_call(model=None, /, *, real_compile=None, **settings):
    """Stands in for ``torch.compile(model, **settings)``: a plain function is compiled
    (``real_compile(function, **settings)``, torch.compile by default) at its first call,
    then every call goes to the compiled function. Used as ``@compile_on_first_call`` or
    ``@compile_on_first_call(**settings)``; anything but a plain function (a module, a
    method) goes to ``real_compile`` at once."""
    real_compile = real_compile or _real_compile
    if model is None:
        return functools.partial(compile_on_first_call, real_compile=real_compile, **settings)
    if not inspect.isfunction(model):
        return real_compile(model, **settings)
    compiled = None

    @functools.wraps(model)
    def first_call_compiles(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            compiled = real_compile(model, **settings)
        return compiled(*args, **kwargs)

    first_call_compiles.compile_deferred = True  # what tests and curious users can check
    return first_call_compiles


@contextlib.contextmanager
def compile_deferred_on_cpu():
    """Inside the block ``torch.compile`` is :func:`compile_on_first_call`, on a machine
    without CUDA devices; with one, the block runs unchanged. Yields whether it defers."""
    if torch.cuda.device_count() > 0:
        yield False
        return
    torch.compile = compile_on_first_call
    try:
        yield True
    finally:
        torch.compile = _real_compile


def import_megatron_on_cpu() -> None:
    """On a machine without CUDA devices, import ``megatron.core`` now, with its fusions
    compiled on first call (see the module docstring). A no-op with CUDA devices (Megatron
    is then imported by whichever module needs it first) or once Megatron is imported."""
    if "megatron.core" in sys.modules:
        return
    with compile_deferred_on_cpu() as deferring:
        if deferring:
            import megatron.core  # noqa: F401
            import megatron.core.jit  # noqa: F401  (megatron.core imports it today; made sure of)
