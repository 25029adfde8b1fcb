"""Build, load and call the banded CPU attention kernel (``csrc/sliding_window_cpu.cpp``).

The kernel computes exactly the band of each block of query rows with its own
register-tiled micro-kernel (no BLAS), forward in parallel over (batch·head, block),
backward over segments of each batch·head's blocks (so batch 1 with few heads still uses
every core), with work stealing between threads. float32 and float64; results do not depend
on the thread count.

The kernel is compiled on first use with the machine's C++ compiler against the installed
torch (no ninja, no Python headers: it registers plain ``torch.ops.rnope.*`` operators and
is loaded with ``torch.ops.load_library``). The shared object is cached under
``$RNOPE_KERNEL_CACHE`` (default ``~/.cache/rnope_megatron``), keyed by the source, the
compiler flags and the torch version; concurrent processes (torchrun, spawned tests) wait
on a file lock while one of them builds.

Selection (``RNOPE_SWA_CPU_KERNEL``): ``auto`` (default: the native kernel when it builds
and the dtype is float32/float64, else the pure-torch blocked-SDPA path), ``native``
(fail loudly if it cannot build), ``sdpa`` (never build or use it).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from rnope_megatron.common.errors import UserError

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "sliding_window_cpu.cpp"
# The translation unit's headers (micro-kernel, band geometry, work scheduler): part of
# the cache key, so editing any of them rebuilds.
HEADERS = sorted(CSRC.glob("*.h"))
KERNEL_DTYPES = (torch.float32, torch.float64)
_CHOICES = ("auto", "native", "sdpa")


class KernelBuildError(UserError, RuntimeError):
    """The native CPU kernel could not be compiled or loaded; the message has the log."""


def kernel_choice() -> str:
    """The ``RNOPE_SWA_CPU_KERNEL`` setting, validated."""
    choice = os.environ.get("RNOPE_SWA_CPU_KERNEL", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"RNOPE_SWA_CPU_KERNEL must be one of {_CHOICES}, got {choice!r}")
    return choice


def _vector_flags() -> list[str]:
    # AVX2+FMA covers every x86 server of the last decade; the micro-kernel's tiles are
    # sized for 16 256-bit registers. Elsewhere the vector extensions and at::vec compile
    # to portable code.
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def _compile_command(output: Path) -> list[str]:
    # The paths torch.utils.cpp_extension would use, without importing it (its import
    # warns about CUDA_HOME on CPU machines).
    root = Path(torch.__file__).parent
    include_paths = [root / "include", root / "include" / "torch" / "csrc" / "api" / "include"]
    libs = [root / "lib"]
    compiler = os.environ.get("CXX", "c++")
    return [
        compiler, "-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *_vector_flags(),
        f"-I{CSRC}", *(f"-I{p}" for p in include_paths),
        str(SOURCE), "-o", str(output),
        *(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs),
        "-ltorch", "-ltorch_cpu", "-lc10",
    ]


def _cache_dir() -> Path:
    return Path(os.environ.get("RNOPE_KERNEL_CACHE", Path.home() / ".cache" / "rnope_megatron"))


def library_path() -> Path:
    """Where the shared object for this source, these flags and this torch lives."""
    key = hashlib.sha256()
    for path in (SOURCE, *HEADERS):
        key.update(path.read_bytes())
    key.update(" ".join(_compile_command(Path("x"))).encode())
    key.update(torch.__version__.encode())
    return _cache_dir() / f"sliding_window_cpu-{key.hexdigest()[:16]}.so"


def build(verbose: bool = False) -> Path:
    """Compile the kernel unless the cache has it; returns the shared object's path."""
    target = library_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = _compile_command(target)[0]
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C++ compiler {compiler!r} on PATH (set CXX)")
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait, then reuse
        if target.exists():
            return target
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        command = _compile_command(partial)
        if verbose:
            print(" ".join(command), file=sys.stderr)
        print("rnope-megatron: compiling the CPU sliding-window kernel (once per machine, "
              "~15 s)...", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise KernelBuildError(
                f"compiling {SOURCE.name} failed ({done.returncode}):\n{done.stderr[-4000:]}"
            )
        os.replace(partial, target)  # atomic: a reader never sees half a library
    return target


@functools.cache
def _load() -> bool:
    """Build and load the operators once per process; False (with one warning) on failure
    under ``auto``, an exception under ``native``."""
    try:
        torch.ops.load_library(str(build()))
        return True
    except (KernelBuildError, OSError, RuntimeError) as err:
        if kernel_choice() == "native":
            raise
        warnings.warn(
            f"rnope-megatron: native CPU sliding-window kernel unavailable, using the slower "
            f"blocked-SDPA path ({str(err).splitlines()[0]})", stacklevel=3,
        )
        return False


def native_kernel_usable(dtype: torch.dtype) -> bool:
    """Whether :func:`sliding_window_cpu` will run for tensors of ``dtype``."""
    choice = kernel_choice()
    if choice == "sdpa":
        return False
    if dtype not in KERNEL_DTYPES:
        if choice == "native":
            raise ValueError(f"the native CPU kernel supports {KERNEL_DTYPES}, got {dtype}")
        return False
    return _load()


def kernel_in_use() -> str:
    """Which kernel float32 sliding-window attention runs on here: ``native``, ``sdpa``
    (the pure-torch path) or ``cuda`` (FlexAttention; the CPU kernels are not used)."""
    if torch.cuda.is_available():
        return "cuda"
    return "native" if native_kernel_usable(torch.float32) else "sdpa"


def stolen_items() -> int:
    """Work items threads took from each other's ranges since the kernel was loaded."""
    _load()
    return int(torch.ops.rnope.sliding_window_cpu_stolen_items())


def block_rows(window: int) -> int:
    """Query rows per block. The kernel skips masked tiles, so masked work per row does
    not grow with the block; 64 rows amortise the per-block work (row masks, softmax
    set-up) while a block's
    [rows, W + rows] score buffer stays in L2 up to W of a few thousand. Measured with
    32/64/128/256 rows at W = 64..512 (benchmarks/attention.py): 64 best or tied."""
    del window  # one size fits the measured range; kept as the tuning hook
    return 64


class SlidingWindowCPU(torch.autograd.Function):
    """Exact sliding-window attention on the native kernel. q is [..., Lq, D], k and v
    [..., Lk, D] with Lk >= Lq: the queries are the last Lq positions of the keys (a
    context-parallel chunk after its halo; Lk - Lq < window). Contiguous, one dtype in
    :data:`KERNEL_DTYPES`, equal head counts. The leading dims are flattened inside (not
    as autograd views: four fewer graph nodes per call)."""

    @staticmethod
    def forward(ctx, q, k, v, window: int, scale: float):
        block_q = block_rows(window)
        fq = q.view(-1, *q.shape[-2:])
        fk, fv = (x.view(-1, *k.shape[-2:]) for x in (k, v))
        out, lse = torch.ops.rnope.sliding_window_cpu_forward(fq, fk, fv, window, scale, block_q)
        ctx.save_for_backward(fq, fk, fv, out, lse)
        ctx.args = (window, scale, block_q)
        ctx.shapes = q.shape, k.shape
        return out.view(q.shape)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.rnope.sliding_window_cpu_backward(
            grad_out.contiguous().view(q.shape), q, k, v, out, lse, *ctx.args
        )
        q_shape, k_shape = ctx.shapes
        return dq.view(q_shape), dk.view(k_shape), dv.view(k_shape), None, None


def sliding_window_cpu(q, k, v, window: int, scale: float) -> torch.Tensor:
    """[B, H, Lq, D] q and [B, H, Lk, D] k, v (Lk >= Lq, equal head counts) → [B, H, Lq, D]."""
    if not _load():
        raise KernelBuildError("the native CPU sliding-window kernel did not build (see the warning)")
    return SlidingWindowCPU.apply(q.contiguous(), k.contiguous(), v.contiguous(), window, scale)
