"""Device-agnostic norms for the portable backend, with Megatron's norm signature.

Megatron's own ``WrappedTorchNorm`` refuses sequence parallelism and its LayerNorm carries
a bias; Cohere's LayerNorm has none. These compute in fp32 (as HF and TE do) and tag the
weight with ``sequence_parallel`` so Megatron all-reduces its gradient across TP ranks."""

from __future__ import annotations

import re

import torch
from torch import nn

# A LayerNorm bias in Megatron's names: TE's fused norm-linear (``layer_norm_bias``), a
# separate norm (``input_layernorm.bias``, ``final_layernorm.bias``).
_NORM_BIAS = re.compile(r"(layer_norm_bias|layernorm\.bias)$")


def is_norm_bias(name: str) -> bool:
    """Whether a parameter/state-dict name is a LayerNorm's bias. The model has none (the
    portable norm, Cohere2); TE's LayerNorm always has one, kept at zero and frozen."""
    return _NORM_BIAS.search(name) is not None


class PortableNorm(nn.Module):
    """RMSNorm or bias-free LayerNorm (``config.normalization``) over the last dimension."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        if config.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"normalization {config.normalization!r} is not RMSNorm or LayerNorm")
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if not self.rms:
            xf = xf - xf.mean(-1, keepdim=True)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        kind = "RMSNorm" if self.rms else "LayerNorm(no bias)"
        return f"{kind}({self.weight.numel()}, eps={self.eps})"
