"""Exclusive locks on folders a process writes: ``flock`` on a lock file inside the folder.

The lock file records who holds it (pid, host, start time) so a refused process can name
the holder. The kernel releases an ``flock`` when its holder exits, however it exits
(``kill -9`` included): a lock of a dead process is simply taken by the next one, no
stale-lock clean-up is needed. (On network file systems the lock is as good as their
``flock`` support: Lustre needs the ``flock`` mount option.)

A process refused a lock must leave nothing behind: :meth:`DirectoryLock.abandon` removes
the lock file and the folders that this process created only to hold it.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import socket
import time

LOCK_NAME = ".rnope-train.lock"


def _first_missing(path: pathlib.Path) -> pathlib.Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


class DirectoryLock:
    """An exclusive lock on ``directory`` for the life of this process (or until released)."""

    def __init__(self, directory, name: str = LOCK_NAME):
        self.directory = pathlib.Path(directory)
        self.path = self.directory / name
        self._file = None
        self._created_folder = None
        self._created_file = False

    def _open(self):
        self._created_folder = _first_missing(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._created_file = not self.path.exists()
        return open(self.path, "a+")

    @staticmethod
    def _holder(handle) -> str:
        handle.seek(0)
        try:
            info = json.loads(handle.read().strip())
            return f"pid {info['pid']} on {info['host']} since {info['started']}"
        except (ValueError, KeyError, TypeError):
            return "another process"

    def _record_holder(self, handle) -> None:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        handle.flush()
        self._file = handle

    def try_acquire(self) -> str | None:
        """Take the lock; returns None, or a description of the holder when it is taken
        (then nothing this call created is left behind)."""
        handle = self._open()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(handle)
            handle.close()
            return holder
        self._record_holder(handle)
        return None

    def acquire_waiting(self, on_wait=None) -> None:
        """Take the lock, waiting for its holder to release it; ``on_wait(holder)`` is
        called once first when there is one to wait for."""
        handle = self._open()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(self._holder(handle))
            fcntl.flock(handle, fcntl.LOCK_EX)
        self._record_holder(handle)

    def release(self) -> None:
        """Let the next process have the folder (the lock file stays: unlinking it would
        let two processes lock two different files of one name)."""
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None

    def abandon(self) -> None:
        """Release, and remove what taking this lock created (the lock file, folders made
        for it) when nothing else was put there: for a run refused before it started."""
        if self._file is not None and self._created_file:
            self.path.unlink(missing_ok=True)  # while still held: no one locked this inode
        self.release()
        if self._created_folder is not None:
            for folder in (self.directory, *self.directory.parents):
                try:
                    folder.rmdir()  # only empty folders
                except OSError:
                    break
                if folder == self._created_folder:
                    break
