"""Megatron's checkpoint writer without a multiprocessing Manager.

megatron-core's ``filesystem_async.get_write_results_queue`` creates, on the first save,
a ``multiprocessing.Manager().Queue()`` (a spawned server process of ~576 MB, plus
multiprocessing's resource tracker) and keeps it for the life of the process. It lives
in the trainer's process group, so a SIGTERM to the group (``timeout``, ``kill -- -PGID``,
schedulers) kills it before our pre-emption save, which then fails with BrokenPipeError;
and a ``kill -9`` of the trainer leaves both processes orphaned.

We save synchronously: the writer threads put their results on that queue and the same
process reads them back (``retrieve_write_results``), so a thread-safe in-process
``queue.Queue`` is all it needs. :func:`install` puts one in Megatron's module-level slot
before the first save, and no Manager is ever started. (An asynchronous save, writing
from a separate process, would need the Manager back; we do not use one.)
"""

from __future__ import annotations

import queue


def install() -> None:
    """Make Megatron's writer use an in-process queue (idempotent)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(filesystem_async._results_queue, queue.Queue):
        if filesystem_async._results_queue is not None:
            raise RuntimeError("megatron's checkpoint writer already started a multiprocessing Manager")
        filesystem_async._results_queue = queue.Queue()
