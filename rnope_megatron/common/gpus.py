"""The GPU models recipes are planned and checked for.

One table, read by the FP8 policy (which attention backends TE offers on which
architecture) and by the planner (memory, peak throughput). ``detect()`` reads the GPU of
the running process; ``--gpu NAME`` options let a recipe be checked on a machine without
one.
"""

from __future__ import annotations

import dataclasses

from rnope_megatron.common.errors import UserError


@dataclasses.dataclass(frozen=True)
class GPU:
    """One GPU model (SXM parts; dense, no sparsity)."""

    name: str
    """Short name used on command lines and in recipes (``h100``)."""
    compute_capability: tuple[int, int]
    """CUDA compute capability: (9, 0) Hopper, (10, 0) Blackwell."""
    memory_gb: float
    """Device memory in GB (10^9 bytes), as the vendor states it."""
    bf16_tflops: float
    """Dense BF16 tensor-core peak (vendor datasheet)."""
    fp8_tflops: float
    """Dense FP8 tensor-core peak (vendor datasheet)."""

    @property
    def architecture(self) -> str:
        return {9: "hopper", 10: "blackwell"}.get(self.compute_capability[0], f"sm{self.compute_capability[0]}0")

    @property
    def sm(self) -> int:
        """Compute capability as TE writes it: 90, 100."""
        return self.compute_capability[0] * 10 + self.compute_capability[1]


# Datasheet numbers (dense): H100 SXM 80 GB 989 / 1979 TFLOP/s; H200 SXM 141 GB, same
# compute; B200 180 GB (HGX B200 per GPU) 2250 / 4500 TFLOP/s.
GPUS: dict[str, GPU] = {
    gpu.name: gpu
    for gpu in (
        GPU("h100", (9, 0), 80.0, 989.0, 1979.0),
        GPU("h200", (9, 0), 141.0, 989.0, 1979.0),
        GPU("b200", (10, 0), 180.0, 2250.0, 4500.0),
    )
}


def by_name(name: str, field: str = "--gpu") -> GPU:
    """The GPU called ``name``; an unknown name is a UserError naming ``field``."""
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise UserError(f"{field}: unknown GPU {name!r} (known: {', '.join(GPUS)})") from None


def detect() -> GPU | None:
    """The table entry closest to this process's CUDA device 0, or None without CUDA.

    An unlisted device is matched by compute capability (its memory read from the device),
    so an H800 plans as Hopper and a GB200 as Blackwell."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    capability = (props.major, props.minor)
    name = props.name.lower()
    for gpu in GPUS.values():
        if gpu.name in name:
            return gpu
    same_arch = [gpu for gpu in GPUS.values() if gpu.compute_capability[0] == capability[0]]
    base = same_arch[0] if same_arch else GPUS["h100"]
    return dataclasses.replace(base, name=name, compute_capability=capability,
                               memory_gb=props.total_memory / 1e9)


def te_version() -> tuple[int, int] | None:
    """Transformer Engine's (major, minor) when installed."""
    from importlib import metadata

    for name in ("transformer_engine", "transformer-engine"):
        try:
            major, minor = metadata.version(name).split(".")[:2]
            return int(major), int(minor)
        except (metadata.PackageNotFoundError, ValueError):
            continue
    return None


def cudnn_version() -> tuple[int, int] | None:
    """cuDNN's (major, minor): the one TE loaded, else torch's; None without cuDNN 9."""
    try:  # the cuDNN TE loaded, when TE is there; torch's otherwise (the same in NGC images)
        from transformer_engine.pytorch.utils import get_cudnn_version

        return tuple(get_cudnn_version()[:2])
    except Exception:  # noqa: BLE001  (no TE, or an older TE without it)
        import torch

        version = torch.backends.cudnn.version()
        return (version // 10000, version // 100 % 100) if version and version >= 9000 else None
