"""The quantization formats ``rnope-quantize`` offers, as modelopt configs.

Each format is one of Model Optimizer's own PTQ configs, used unchanged: modelopt's rules
(e.g. the output layer kept in high precision, ``*output_layer*`` disabled) apply as they
do for any Megatron model. Linears of our layers are Megatron's own
``ColumnParallelLinear``/``RowParallelLinear`` (portable backend) or TE's wrappers (te
backend): modelopt's Megatron plugin registers both kinds itself, so no module of ours
needs registering (see docs/quantization.md).
"""

from __future__ import annotations

import copy
import dataclasses

from rnope_megatron.checkpoint.quantizer_state import EXTRA, INSTALL_HINT, require_modelopt  # noqa: F401  (re-exported)


@dataclasses.dataclass(frozen=True)
class Format:
    """One quantization format."""

    name: str
    """The ``--format`` value."""
    config: str
    """Name of the modelopt config (``modelopt.torch.quantization.<config>``)."""
    description: str
    """What is quantized how (for ``--help`` and the report)."""
    needs_cuda: bool = False
    """modelopt's fake quantization for this format runs only on CUDA (no CPU kernel)."""


FORMATS = {f.name: f for f in (
    Format("fp8", "FP8_DEFAULT_CFG", "FP8 E4M3 weights and activations, per-tensor scales"),
    Format("nvfp4", "NVFP4_DEFAULT_CFG", "NVFP4 (E2M1, FP8 scales per 16 values) weights and activations",
           # modelopt 0.47's dynamic block fake-quant asserts amax.is_cuda (triton / CUDA extension)
           needs_cuda=True),
    Format("int4_awq", "INT4_AWQ_CFG", "INT4 weights (blocks of 128, AWQ-lite scales), 16-bit activations"),
    Format("int8_sq", "INT8_SMOOTHQUANT_CFG", "INT8 weights (per channel) and activations (per tensor), SmoothQuant"),
)}


def format_named(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown quantization format {name!r} (choose one of {', '.join(FORMATS)})")
    return FORMATS[name]


def modelopt_config(fmt: Format) -> dict:
    """A private copy of the format's modelopt config (modelopt mutates what it is given)."""
    return copy.deepcopy(getattr(require_modelopt(), fmt.config))


def check_device(fmt: Format, on_cuda: bool) -> None:
    """Refuse, before any work, a format modelopt cannot run on this device."""
    if fmt.needs_cuda and not on_cuda:
        raise ValueError(f"--format {fmt.name}: Model Optimizer's {fmt.name} fake quantization runs only on CUDA "
                         "(no CPU kernel in nvidia-modelopt); run on a GPU or choose fp8, int4_awq or int8_sq")
