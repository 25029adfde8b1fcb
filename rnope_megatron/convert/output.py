"""A converter's output directory: the shared staged writer of :mod:`rnope_megatron.outputs`
(kept here so existing imports keep working)."""

from __future__ import annotations

from rnope_megatron.outputs import MARKER, check_output, staged_output  # noqa: F401
