"""FP8 training on the ``te`` backend: the per-layer precision policy (the recipe section
is :class:`rnope_megatron.recipe.sections.FP8Section`; its GPU-free checks are in
:mod:`rnope_megatron.recipe.validation`).

Transformer Engine decides per *call* whether attention runs in FP8: a
``DotProductAttention`` runs FP8 when it is called inside an enabled TE autocast whose
recipe has ``fp8_dpa`` set (``DotProductAttention.init_fp8_metadata`` takes the recipe from
the innermost autocast). Megatron builds that recipe from one global
``fp8_dot_product_attention`` flag, so it can only say "FP8 attention everywhere" or
"nowhere". The policy here decides per layer:

* ``fp8_dot_product_attention`` is set when any layer runs FP8 attention;
* layers that must keep bf16 attention under that flag (sliding layers on Hopper, where no
  TE backend serves FP8 attention with a window) get
  :class:`~rnope_megatron.attention.te_precision.BF16AttentionTEDotProductAttention`, which
  calls Megatron's TE attention inside a nested, disabled TE autocast (TE's documented way
  to give layers different recipes). Their linears stay in FP8.

What TE can run comes from its sources (TE 2.x ``get_attention_backend`` and the recipes): no FP8 attention with a window below sm100 (and from TE 2.16 with cuDNN 9.21
on sm100); current scaling (``tensorwise``) FP8 attention only on sm100+ (TE 2.9+); the
``blockwise`` recipe has none (TE's Float8BlockScaling refuses ``fp8_dpa``); ``mxfp8`` is
Blackwell-only (FP8 attention with it from TE 2.16); FP8 attention under TE's all-gather
context parallelism from TE 2.16. Every impossible combination is a :class:`RecipeError`
naming the field, before any process group exists.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from rnope_megatron.common import gpus
from rnope_megatron.common.gpus import GPU
from rnope_megatron.common.typed import ConfigError as RecipeError

# Oldest TE in which each capability exists (the [te] extra allows TE >= 2.3).
TE_FOR_TENSORWISE_ATTENTION = (2, 9)
TE_FOR_WINDOW_FP8_ATTENTION = (2, 16)  # with cuDNN >= 9.21, sm100+
TE_FOR_MXFP8_ATTENTION = (2, 16)
TE_FOR_ALL_GATHER_CP_FP8 = (2, 16)
CUDNN_FOR_WINDOW_FP8_ATTENTION = (9, 21)


@dataclasses.dataclass(frozen=True)
class Platform:
    """What FP8 support depends on: the GPU and, when known, TE's and cuDNN's versions.

    Checking a recipe without a GPU (``rnope-train --check --gpu h100``) leaves the versions
    unknown; they are then assumed recent enough, and checked again at launch."""

    gpu: GPU
    te_version: Optional[tuple[int, int]] = None
    cudnn_version: Optional[tuple[int, int]] = None

    @classmethod
    def detect(cls) -> Optional["Platform"]:
        """This process's GPU and libraries, or None without CUDA."""
        gpu = gpus.detect()
        if gpu is None:
            return None
        return cls(gpu, gpus.te_version(), gpus.cudnn_version())

    def describe(self) -> str:
        te = "TE %d.%d" % self.te_version if self.te_version else "TE version unknown (assumed >= 2.16)"
        cudnn = "cuDNN %d.%d" % self.cudnn_version if self.cudnn_version else "cuDNN unknown (assumed >= 9.21)"
        return f"{self.gpu.name} (sm{self.gpu.sm}), {te}, {cudnn}"

    def te_at_least(self, version: tuple[int, int]) -> bool:
        return self.te_version is None or self.te_version >= version

    def cudnn_at_least(self, version: tuple[int, int]) -> bool:
        return self.cudnn_version is None or self.cudnn_version >= version


def fp8_attention_unavailable(fp8, kind, platform: Platform,
                              cp_comm: Optional[str] = None) -> Optional[str]:
    """Why TE cannot run FP8 attention on a layer of this kind, or None if it can.

    ``cp_comm``: the layer's context-parallel communication (None without CP)."""
    gpu, recipe = platform.gpu, fp8.recipe
    if recipe == "blockwise":
        return "the blockwise recipe has no FP8 attention (TE's Float8BlockScaling refuses fp8_dpa)"
    if gpu.sm == 120:
        return f"TE has no FP8 attention on sm120 ({gpu.name})"
    if recipe == "tensorwise" and gpu.sm < 100:
        return f"TE refuses tensorwise (current-scaling) FP8 attention below sm100 ({gpu.name} is sm{gpu.sm})"
    if recipe == "tensorwise" and not platform.te_at_least(TE_FOR_TENSORWISE_ATTENTION):
        return "tensorwise FP8 attention needs TE >= %d.%d" % TE_FOR_TENSORWISE_ATTENTION
    if recipe == "mxfp8" and not platform.te_at_least(TE_FOR_MXFP8_ATTENTION):
        return "MXFP8 attention needs TE >= %d.%d" % TE_FOR_MXFP8_ATTENTION
    if kind.sliding:
        if gpu.sm < 100:
            return (f"no TE backend runs FP8 attention with a sliding window below sm100 "
                    f"({gpu.name} is sm{gpu.sm})")
        if not platform.te_at_least(TE_FOR_WINDOW_FP8_ATTENTION) or \
                not platform.cudnn_at_least(CUDNN_FOR_WINDOW_FP8_ATTENTION):
            return ("FP8 attention with a sliding window needs TE >= %d.%d and cuDNN >= %d.%d"
                    % (TE_FOR_WINDOW_FP8_ATTENTION + CUDNN_FOR_WINDOW_FP8_ATTENTION))
    if cp_comm == "all_gather" and not platform.te_at_least(TE_FOR_ALL_GATHER_CP_FP8):
        return "FP8 attention under all_gather context parallelism needs TE >= %d.%d" % TE_FOR_ALL_GATHER_CP_FP8
    return None


@dataclasses.dataclass(frozen=True)
class LayerPrecision:
    """The precision of one layer (global 1-based ``number``)."""

    number: int
    letter: str
    fp8_linears: bool
    fp8_attention: bool
    why_bf16_attention: str = ""
    """Why attention stays bf16 (empty when it is FP8, or without FP8 at all)."""


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
    """Per-layer precision of a run, and what Megatron and the specs get from it."""

    fp8: Optional[object]
    """The ``train.fp8`` section (None: no FP8)."""
    layers: tuple[LayerPrecision, ...]
    dtype: str = "bf16"
    """``train.precision``: what runs outside FP8."""

    @property
    def fp8_attention_anywhere(self) -> bool:
        return any(layer.fp8_attention for layer in self.layers)

    def transformer_config_fields(self) -> dict:
        """TransformerConfig overrides (none without FP8)."""
        if self.fp8 is None:
            return {}
        n = self.fp8.bf16_first_last_layers
        return dict(fp8=self.fp8.format, fp8_recipe=self.fp8.recipe, first_last_layers_bf16=n > 0,
                    num_layers_at_start_in_bf16=n, num_layers_at_end_in_bf16=n,
                    fp8_dot_product_attention=self.fp8_attention_anywhere)

    def bf16_attention_layers(self) -> frozenset[int]:
        """Layers that run under an FP8 recipe with ``fp8_dpa`` set but must keep bf16
        attention: their specs get the bf16-attention wrapper. Layers outside FP8
        altogether (bf16 first/last) need none: Megatron gives them no FP8 autocast."""
        if not self.fp8_attention_anywhere:
            return frozenset()
        return frozenset(layer.number for layer in self.layers if layer.fp8_linears and not layer.fp8_attention)

    def describe(self) -> str:
        """One line per layer (``rnope-train --check``)."""
        rows = []
        for layer in self.layers:
            linears = "fp8" if layer.fp8_linears else self.dtype
            attention = "fp8" if layer.fp8_attention else self.dtype
            why = f"  ({layer.why_bf16_attention})" if layer.why_bf16_attention else ""
            rows.append(f"layer {layer.number:3d}  {layer.letter}  linears {linears:<4s} attention {attention:<4s}{why}".rstrip())
        return "\n".join(rows)


def plan_precision(recipe, platform: Optional[Platform]) -> PrecisionPlan:
    """Each layer's precision for ``recipe`` on ``platform``, or a RecipeError naming the
    field that asks for what TE cannot run there. ``platform`` may be None only without FP8."""
    m, fp8 = recipe.model, recipe.train.fp8
    pattern = m.layer_pattern
    numbers = range(1, m.num_layers + 1)
    if fp8 is None:
        return PrecisionPlan(None, tuple(LayerPrecision(n, pattern.layers[n - 1], False, False) for n in numbers),
                             recipe.train.precision)
    if platform is None:
        raise RecipeError("train.fp8: the GPU is unknown (no CUDA device here): run on a GPU, or check the recipe "
                          "with rnope-train --check --gpu h100|h200|b200")
    gpu = platform.gpu
    if gpu.sm < 89:
        raise RecipeError(f"train.fp8: {gpu.name} (sm{gpu.sm}) has no FP8 tensor cores (needs sm89 or newer)")
    if fp8.recipe == "mxfp8" and gpu.sm < 100:
        raise RecipeError(f"train.fp8.recipe=mxfp8: Blackwell (sm100+) only; {gpu.name} is sm{gpu.sm}")
    comm = m.cp_comm_types(recipe.parallel, recipe.train.backend) if recipe.parallel.context > 1 else None
    n_bf16 = fp8.bf16_first_last_layers
    layers = []
    for n in numbers:
        kind = pattern.kind(n)
        if n <= n_bf16 or n > m.num_layers - n_bf16:
            layers.append(LayerPrecision(n, kind.letter, False, False, "train.fp8.bf16_first_last_layers"))
            continue
        why = fp8_attention_unavailable(fp8, kind, platform, comm[n - 1] if comm else None)
        wanted = fp8.attention == "all" or (fp8.attention == "global_only" and not kind.sliding) or \
            (fp8.attention == "auto" and why is None)
        if wanted and why is not None:
            which = "sliding" if kind.sliding else "global"
            raise RecipeError(f"train.fp8.attention={fp8.attention}: FP8 attention on {which} layer {n} "
                              f"({kind.letter}): {why}")
        if not wanted:
            why = "train.fp8.attention=off" if fp8.attention == "off" else why or f"train.fp8.attention={fp8.attention}"
        layers.append(LayerPrecision(n, kind.letter, True, wanted, "" if wanted else why))
    return PrecisionPlan(fp8, tuple(layers), recipe.train.precision)
