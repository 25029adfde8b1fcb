"""The layer pattern: the single source of truth for which layer is which kind.

A pattern is a string of layer letters, either one block repeated to ``num_layers``
(``"SSSG"`` for RNoPE-SWA) or a full explicit per-layer string:

====== ======================== ============== ===================================
letter attention                position       used by
====== ======================== ============== ===================================
``S``  sliding window (local)   RoPE           RNoPE-SWA local layers
``G``  global causal            none (NoPE)    RNoPE-SWA global layers, NoPE model
``R``  global causal            RoPE           classic RoPE model, "RoPE on global"
====== ======================== ============== ===================================

Baselines from the paper: ``"R"`` (all-global RoPE), ``"G"`` (all-global NoPE), ``"SSSR"``
(RoPE on the global layers, an ablation). Everything else in the package (Megatron's
``window_attn_skip_freq`` / ``no_rope_freq`` lists, the layer specs, the HF ``layer_types``)
is derived from the expanded pattern here.
"""

from __future__ import annotations

import dataclasses
import warnings

LETTERS = {
    "S": "sliding-window attention with RoPE",
    "G": "global causal attention, no positional encoding (NoPE)",
    "R": "global causal attention with RoPE",
}


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """What one layer is: its attention span and whether it rotates q/k."""

    letter: str
    sliding: bool
    rope: bool

    @classmethod
    def of(cls, letter: str) -> "LayerKind":
        return cls(letter=letter, sliding=letter == "S", rope=letter in "SR")


def expand_pattern(pattern: str, num_layers: int) -> str:
    """Return the explicit per-layer pattern (length ``num_layers``) or raise ValueError."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern must be a non-empty string of {sorted(LETTERS)}, got {pattern!r}")
    bad = sorted({c for c in pattern if c not in LETTERS})
    if bad:
        known = ", ".join(f"{k}={v}" for k, v in LETTERS.items())
        raise ValueError(f"pattern {pattern!r} has unknown letter(s) {bad}; known: {known}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_layers % len(pattern):
        raise ValueError(
            f"pattern {pattern!r} (length {len(pattern)}) does not tile num_layers={num_layers}; "
            f"give a block whose length divides {num_layers} or a full {num_layers}-letter string"
        )
    return pattern * (num_layers // len(pattern))


@dataclasses.dataclass(frozen=True)
class LayerPattern:
    """An expanded, validated pattern with the derived per-layer views.

    Attributes:
        layers: the explicit pattern, one letter per layer (index 0 = layer number 1).
        window: sliding window in HF semantics (W keys including the current one).
    """

    layers: str
    window: int

    @classmethod
    def build(cls, pattern: str, num_layers: int, window: int, max_seq_length: int | None = None):
        layers = expand_pattern(pattern, num_layers)
        if "S" in layers:
            if not isinstance(window, int) or window < 1:
                raise ValueError(f"window must be an integer >= 1, got {window!r}")
            if max_seq_length is not None and window >= max_seq_length:
                warnings.warn(
                    f"window={window} >= max_seq_length={max_seq_length}: the sliding layers "
                    "see every token, i.e. they behave as global RoPE layers",
                    stacklevel=2,
                )
        return cls(layers=layers, window=window)

    def kind(self, layer_number: int) -> LayerKind:
        """Kind of the layer with Megatron's global 1-based ``layer_number``."""
        if not 1 <= layer_number <= len(self.layers):
            raise IndexError(f"layer_number {layer_number} outside 1..{len(self.layers)}")
        return LayerKind.of(self.layers[layer_number - 1])

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def has_sliding(self) -> bool:
        return "S" in self.layers

    def window_of(self, kind: LayerKind) -> int | None:
        """The HF window of a layer of this kind, or None for a global layer."""
        return self.window if kind.sliding else None

    # ---- Megatron-Core's native per-layer vocabulary (what TE's wrappers read) ----
    def window_attn_skip_freq(self) -> list[int]:
        """Megatron ``window_attn_skip_freq`` as a list: 1 = this layer uses the window."""
        return [int(c == "S") for c in self.layers]

    def no_rope_freq(self) -> list[int]:
        """Megatron ``no_rope_freq`` as a list: 1 = this layer skips RoPE."""
        return [int(not LayerKind.of(c).rope) for c in self.layers]

    def te_window_size(self) -> tuple[int, int] | None:
        """Transformer Engine's inclusive ``(left, right)`` window for the sliding layers.

        This is the one place where the HF window W becomes TE's ``(W-1, 0)``: TE counts
        the keys *before* the current one, HF counts the current one too."""
        return (self.window - 1, 0) if self.has_sliding else None

    def megatron_fields(self) -> dict:
        """The TransformerConfig fields that carry the pattern to Megatron's own modules
        (TEDotProductAttention reads the window through ``is_layer_window_attention``).
        Our portable modules get their window and RoPE base as spec params instead
        (:mod:`rnope_megatron.model.specs`), from the same pattern."""
        return dict(
            window_size=self.te_window_size(),
            window_attn_skip_freq=self.window_attn_skip_freq() if self.has_sliding else None,
            no_rope_freq=self.no_rope_freq(),
        )

    def hf_layer_types(self) -> list[str]:
        """Hugging Face ``layer_types`` (``sliding_attention`` / ``full_attention``)."""
        return ["sliding_attention" if c == "S" else "full_attention" for c in self.layers]

    def describe(self) -> str:
        """One line per layer, e.g. for ``make demo``."""
        rows = []
        for number, letter in enumerate(self.layers, start=1):
            kind = LayerKind.of(letter)
            span = f"window {self.window}" if kind.sliding else "global"
            rows.append(f"layer {number:3d}  {letter}  {span:<12s} {'RoPE' if kind.rope else 'NoPE'}")
        return "\n".join(rows)

