"""FP8 training on the ``te`` backend: the recipe section and the per-layer policy.

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

What TE can run comes from its sources (TE 2.x ``get_attention_backend`` and the recipes,
see FACTS.md): no FP8 attention with a window below sm100 (and from TE 2.16 with cuDNN 9.21
on sm100); current scaling (``tensorwise``) FP8 attention only on sm100+ (TE 2.9+); the
``blockwise`` recipe has none (TE's Float8BlockScaling refuses ``fp8_dpa``); ``mxfp8`` is
Blackwell-only (FP8 attention with it from TE 2.16); FP8 attention under TE's all-gather
context parallelism from TE 2.16. Every impossible combination is a :class:`RecipeError`
naming the field, before any process group exists.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from rnope_megatron.gpus import GPU
from rnope_megatron.pattern import LayerKind
from rnope_megatron.typed import ConfigError as RecipeError

# Oldest TE in which each capability exists (the [te] extra allows TE >= 2.3).
TE_FOR_TENSORWISE_ATTENTION = (2, 9)
TE_FOR_WINDOW_FP8_ATTENTION = (2, 16)  # with cuDNN >= 9.21, sm100+
TE_FOR_MXFP8_ATTENTION = (2, 16)
TE_FOR_ALL_GATHER_CP_FP8 = (2, 16)
CUDNN_FOR_WINDOW_FP8_ATTENTION = (9, 21)


@dataclasses.dataclass
class FP8Section:
    """``train.fp8``: FP8 through Transformer Engine (``train.backend: te``, ``train.precision:
    bf16``). Absent or ``null``: no FP8."""

    recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "tensorwise"
    """Scaling recipe (Megatron's ``fp8_recipe``). ``tensorwise``: per-tensor current scaling
    (no amax history; the default). ``delayed``: scales from an amax history (the whole
    block shares one autocast, so no bf16 first/last layers). ``blockwise``: 1x128/128x128
    blocks, linears only (no FP8 attention). ``mxfp8``: 32-element micro-blocks, Blackwell
    only."""
    format: Literal["hybrid", "e4m3"] = "hybrid"
    """FP8 formats (Megatron's ``fp8``): ``hybrid`` = E4M3 forward, E5M2 gradients;
    ``e4m3`` everywhere."""
    attention: Literal["auto", "off", "global_only", "all"] = "off"
    """FP8 dot-product attention, per layer. ``off`` (default: TE calls FP8 attention a
    beta feature; the linears are where FP8 pays most): bf16 attention everywhere.
    ``global_only``: FP8 attention on the global layers, bf16 on the sliding ones (refused
    where TE cannot run it on the global layers). ``all``: FP8 attention on every layer
    (refused where TE cannot, e.g. sliding layers on Hopper). ``auto``: FP8 attention on each
    layer where TE can run it on this GPU and recipe, bf16 elsewhere."""
    bf16_first_last_layers: int = 0
    """Layers at each end of the model kept entirely in bf16 (Megatron's
    ``first_last_layers_bf16`` with ``num_layers_at_start/end_in_bf16``). 0 = none. Not with
    ``recipe: delayed``."""


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
        from rnope_megatron import gpus

        gpu = gpus.detect()
        if gpu is None:
            return None
        return cls(gpu, _te_version(), _cudnn_version())

    def describe(self) -> str:
        te = "TE %d.%d" % self.te_version if self.te_version else "TE version unknown (assumed >= 2.16)"
        cudnn = "cuDNN %d.%d" % self.cudnn_version if self.cudnn_version else "cuDNN unknown (assumed >= 9.21)"
        return f"{self.gpu.name} (sm{self.gpu.sm}), {te}, {cudnn}"

    def te_at_least(self, version: tuple[int, int]) -> bool:
        return self.te_version is None or self.te_version >= version

    def cudnn_at_least(self, version: tuple[int, int]) -> bool:
        return self.cudnn_version is None or self.cudnn_version >= version


def _te_version() -> Optional[tuple[int, int]]:
    from importlib import metadata

    for name in ("transformer_engine", "transformer-engine"):
        try:
            major, minor = metadata.version(name).split(".")[:2]
            return int(major), int(minor)
        except (metadata.PackageNotFoundError, ValueError):
            continue
    return None


def _cudnn_version() -> Optional[tuple[int, int]]:
    try:  # the cuDNN TE loaded, when TE is there; torch's otherwise (the same in NGC images)
        from transformer_engine.pytorch.utils import get_cudnn_version

        return tuple(get_cudnn_version()[:2])
    except Exception:  # noqa: BLE001  (no TE, or an older TE without it)
        import torch

        version = torch.backends.cudnn.version()
        return (version // 10000, version // 100 % 100) if version and version >= 9000 else None


def fp8_attention_unavailable(fp8: FP8Section, kind: LayerKind, platform: Platform,
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

    fp8: Optional[FP8Section]
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


def _ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3,5"``."""
    parts, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(parts)


def describe_attention(model, backend: str, plan: PrecisionPlan) -> str:
    """The one line ``rnope-train`` logs at start: attention backend and precision per layer
    kind, e.g. ``attention: S layers (1-3,5-7): te, window 4096, bf16 attention, fp8
    linears; G layers (4,8): te, no RoPE, fp8 attention (fused), fp8 linears``. TE picks
    its bf16 backend per call (flash or cuDNN fused; NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 shows
    which); FP8 training attention has only the cuDNN fused one."""
    pattern = model.layer_pattern
    engine = "te" if backend == "te" else "portable"
    groups = []
    for letter in dict.fromkeys(pattern.layers):  # in order of appearance
        kind = LayerKind.of(letter)
        members = [layer for layer in plan.layers if layer.letter == letter]
        numbers = [layer.number for layer in members]
        facts = [engine, f"window {pattern.window}" if kind.sliding else ("RoPE" if kind.rope else "no RoPE")]
        for what, flag in (("attention", "fp8_attention"), ("linears", "fp8_linears")):
            fp8_numbers = [layer.number for layer in members if getattr(layer, flag)]
            fused = " (fused)" if what == "attention" else ""
            if not fp8_numbers:
                facts.append(f"{plan.dtype} {what}")
            elif len(fp8_numbers) == len(numbers):
                facts.append(f"fp8 {what}{fused}")
            else:
                others = _ranges(sorted(set(numbers) - set(fp8_numbers)))
                facts.append(f"fp8 {what}{fused} ({plan.dtype} on {others})")
        groups.append(f"{letter} layers ({_ranges(numbers)}): {', '.join(facts)}")
    return "attention: " + "; ".join(groups)


# --------------------------------------------------------------------------- checks

def _gemm_multiples(recipe) -> None:
    """TE quantizes GEMM inputs only when the rows (tokens per rank) are a multiple of 8
    and the columns of 16 (MXFP8: both of 32, its block); fail here, not at the first step."""
    m, p, t, fp8 = recipe.model, recipe.parallel, recipe.train, recipe.train.fp8
    rows, cols = (32, 32) if fp8.recipe == "mxfp8" else (8, 16)
    tokens = t.seq_length * t.micro_batch_size // p.context // (p.tensor if p.sequence_parallel else 1)
    if tokens % rows:
        raise RecipeError(f"train.fp8.recipe={fp8.recipe}: {tokens} tokens per micro-batch per rank "
                          f"(train.seq_length x micro_batch_size / parallel sizes) is not a multiple of {rows}")
    widths = {"model.hidden_size": m.hidden_size, "model.ffn_hidden_size / parallel.tensor": m.ffn_size // p.tensor,
              "attention width (heads x head dim) / parallel.tensor": m.num_attention_heads * m.head_dim // p.tensor}
    for name, width in widths.items():
        if width % cols:
            raise RecipeError(f"train.fp8.recipe={fp8.recipe}: {name} = {width} is not a multiple of {cols} "
                              "(TE's FP8 GEMMs)")


def validate_fp8(recipe) -> None:
    """The checks that need no GPU (part of :func:`rnope_megatron.train.validation.validate`)."""
    fp8, t, m = recipe.train.fp8, recipe.train, recipe.model
    if fp8 is None:
        return
    if t.backend != "te":
        raise RecipeError(f"train.fp8: FP8 runs through Transformer Engine: needs train.backend=te "
                          f"(got {t.backend})")
    if t.precision != "bf16":
        raise RecipeError(f"train.fp8: needs train.precision=bf16 (got {t.precision})")
    n = fp8.bf16_first_last_layers
    if n < 0:
        raise RecipeError(f"train.fp8.bf16_first_last_layers={n} must be >= 0")
    if n and fp8.recipe == "delayed":
        raise RecipeError(f"train.fp8.bf16_first_last_layers={n}: not available with train.fp8.recipe=delayed "
                          "(its amax reduction spans the whole block; Megatron refuses it)")
    per_stage = m.num_layers // recipe.parallel.pipeline
    if n > per_stage:
        raise RecipeError(f"train.fp8.bf16_first_last_layers={n} exceeds the layers per pipeline stage ({per_stage})")
    if 2 * n >= m.num_layers:
        raise RecipeError(f"train.fp8.bf16_first_last_layers={n} leaves no FP8 layer of model.num_layers={m.num_layers}")
    _gemm_multiples(recipe)


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
