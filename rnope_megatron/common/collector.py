"""The cyclic garbage collector kept out of heavy imports.

Importing torch makes some 300k objects that live until exit, Megatron some 300k more. The
collector counts allocations, not garbage: while they load it runs hundreds of times,
each time traversing everything loaded so far (about 0.8 s of a console script's start on
one CPU core). Imports make almost no garbage, so pausing it there loses nothing.
Standard library only: the package's ``__init__`` uses it before torch is imported."""

from __future__ import annotations

import contextlib
import gc


def pause() -> bool:
    """Turn the collector off; returns whether it was on (for :func:`resume`)."""
    was_enabled = gc.isenabled()
    gc.disable()
    return was_enabled


def resume(was_enabled: bool, freeze: bool = False) -> None:
    """End a :func:`pause`. ``freeze``: first move every object alive now to the
    collector's permanent generation (gc.freeze), so later collections, the one at exit
    included, never traverse what the imports made (the few thousand objects of garbage
    they left go with them, as Python's documentation of gc.freeze describes)."""
    if freeze:
        gc.freeze()
    if was_enabled:
        gc.enable()


@contextlib.contextmanager
def paused():
    """The collector off inside the block, and on again after it if it was on before."""
    was_enabled = pause()
    try:
        yield
    finally:
        resume(was_enabled)
