"""What ``rnope-train`` prints at start about the model it built: the attention backend
and precision of each layer kind (from the per-layer policy of
:mod:`rnope_megatron.model.precision`)."""

from __future__ import annotations

from rnope_megatron.model.pattern import LayerKind
from rnope_megatron.model.precision import PrecisionPlan


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
