"""Retrofit on import: the same weights under another layer pattern.

``rnope-convert from-hf HF_DIR OUT --pattern SSSG --window W`` loads a checkpoint of any
target into a new pattern. No tensor changes shape or value: every layer keeps its q, k,
v, o, MLP and norm weights; what changes is how attention uses them. A layer that becomes
``G`` stops rotating q and k (NoPE) and sees every earlier token; one that becomes ``S``
rotates with the base it had and sees the last W tokens. The model then needs uptraining
(``checkpoint.load=OUT checkpoint.reset_optimizer=true``) to use its new layers well.
"""

from __future__ import annotations

import dataclasses

from rnope_megatron.model.config import RNoPEConfig
from rnope_megatron.model.pattern import LayerKind, expand_pattern


def retrofit(cfg: RNoPEConfig, pattern: str | None, window: int | None) -> tuple[RNoPEConfig, list[str]]:
    """``cfg`` under ``pattern`` / ``window`` (None keeps each), and one line per layer
    saying what changed. Refuses in one ValueError what cannot carry over."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"--window must be a positive number of tokens, got {window!r}")
    if pattern is None and window is None:
        return cfg, []
    new_pattern = cfg.pattern if pattern is None else pattern
    try:
        layers = expand_pattern(new_pattern, cfg.num_layers)
    except ValueError as err:
        raise ValueError(f"--pattern: {err}") from None
    old = cfg.layer_pattern
    if cfg.qk_norm_local != cfg.qk_norm_global and any(
            LayerKind.of(a).sliding != LayerKind.of(b).sliding for a, b in zip(old.layers, layers)):
        raise ValueError("this model has QK-norm on its " + ("sliding" if cfg.qk_norm_local else "global")
                         + " layers only: a pattern that moves layers between sliding and global cannot carry it")
    old_thetas = {cfg.rope_theta_for(old.kind(n)) for n in range(1, cfg.num_layers + 1)} - {None}
    # New S and R layers rotate with the base the model's rotating layers had (one base:
    # a model with two keeps its own split, S = rope_theta, R = global_rope_theta).
    fields = dict(pattern=new_pattern, window=cfg.window if window is None else window)
    if len(old_thetas) == 1:
        fields.update(rope_theta=old_thetas.pop(), global_rope_theta=None)
    new = dataclasses.replace(cfg, **fields)
    return new, describe_changes(cfg, new)


def describe_changes(old: RNoPEConfig, new: RNoPEConfig) -> list[str]:
    """``layer N: R -> S (window 4096 keys, RoPE base 500000 kept)`` per layer."""
    lines = []
    before, after = old.layer_pattern, new.layer_pattern
    for number in range(1, new.num_layers + 1):
        a, b = before.kind(number), after.kind(number)
        theta_a, theta_b = old.rope_theta_for(a), new.rope_theta_for(b)
        changes = []
        if a.sliding != b.sliding or (b.sliding and old.window != new.window):
            changes.append(f"window of {new.window} keys" if b.sliding else "global (window removed)")
        if theta_a != theta_b:
            if theta_b is None:
                changes.append("RoPE removed (NoPE)")
            elif theta_a is None:
                changes.append(f"RoPE added (base {theta_b:g})")
            else:
                changes.append(f"RoPE base {theta_a:g} -> {theta_b:g}")
        what = "; ".join(changes) if changes else "unchanged"
        lines.append(f"layer {number:3d}: {a.letter} -> {b.letter}  {what}")
    return lines
