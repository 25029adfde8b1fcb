"""One trainer per run directory and per checkpoint directory.

Two trainers writing one ``metrics.jsonl`` corrupt it (the log interleaves); two writing
one checkpoint directory resume from each other's iterations and save over each other
(a campaign found an empty ``iter_0000020`` and both runs exiting 0). Rank 0 holds an
exclusive lock (:mod:`rnope_megatron.common.dir_lock`) on ``logging.run_dir`` and on
``checkpoint.dir`` for the whole run; a second trainer finds either taken and stops before
touching anything, naming the folder, the field to change and the holder, and leaving
nothing behind. The kernel releases the locks when the holder exits, however it exits
(``kill -9`` included), so a dead run's lock never blocks a restart.

The data cache is shared on purpose (runs read it together); only its building is
serialised (:func:`rnope_megatron.data.dataset.build_dataset`).
"""

from __future__ import annotations

from rnope_megatron.common.dir_lock import LOCK_NAME, DirectoryLock  # noqa: F401  (LOCK_NAME re-exported)
from rnope_megatron.common.errors import UserError


class RunDirectoryBusy(UserError, RuntimeError):
    """Another trainer holds the run directory or the checkpoint directory."""


# A lock file in the run directory is the run directory's lock even when another run uses
# that folder as its checkpoint.dir: either way two trainers would write one folder.
RunDirectoryLock = DirectoryLock


class TrainerLocks:
    """The folders one trainer writes, locked together (a folder named twice once)."""

    def __init__(self, recipe):
        folders = [("run directory", "logging.run_dir", recipe.run_dir),
                   ("checkpoint directory", "checkpoint.dir", recipe.checkpoint_dir)]
        self.folders, seen = [], set()
        for what, field, folder in folders:
            key = folder.resolve()
            if key not in seen:
                seen.add(key)
                self.folders.append((what, field, folder, DirectoryLock(folder)))

    def try_acquire(self) -> str | None:
        """Take every lock; returns None, or one line naming the busy folder, its field and
        its holder (then no lock is held and nothing taking them created is left)."""
        taken = []
        for what, field, folder, lock in self.folders:
            holder = lock.try_acquire()
            if holder is not None:
                for earlier in reversed(taken):
                    earlier.abandon()
                return (f"{what} {folder} is in use by another rnope-train ({holder}): stop that run "
                        f"or set another {field}")
            taken.append(lock)
        return None

    def release(self) -> None:
        for *_, lock in self.folders:
            lock.release()
