"""One trainer per run directory.

Two trainers writing one ``metrics.jsonl`` and one checkpoint directory corrupt both (one
crashes, the log interleaves). Rank 0 holds an exclusive ``flock`` on
``<run_dir>/.rnope-train.lock`` for the whole run and writes who holds it there; a second
trainer finds the lock taken and stops before touching anything, naming the holder. The
kernel releases the lock when the holder exits, however it exits (``kill -9`` included),
so a stale lock never blocks a restart. (On network file systems the lock is as good as
their ``flock`` support: Lustre needs the ``flock`` mount option.)
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import socket
import time

from rnope_megatron.common.errors import UserError

LOCK_NAME = ".rnope-train.lock"


class RunDirectoryBusy(UserError, RuntimeError):
    """Another trainer holds the run directory."""


class RunDirectoryLock:
    """Exclusive lock on a run directory for the life of this process."""

    def __init__(self, run_dir):
        self.path = pathlib.Path(run_dir) / LOCK_NAME
        self._file = None

    def try_acquire(self) -> str | None:
        """Take the lock; returns None, or a description of the holder when it is taken."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            try:
                info = json.loads(holder)
                return f"pid {info['pid']} on {info['host']} since {info['started']}"
            except (ValueError, KeyError, TypeError):
                return "another process"
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        handle.flush()
        self._file = handle
        return None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None
