"""The checkpoint directory format, and the one atomic way to write a checkpoint.

Layout of a checkpoint directory (``checkpoint.dir``)::

    iter_0000040/      one complete checkpoint (renamed into place only when whole)
    iter_0000050/
    latest             text file naming the newest complete checkpoint (atomic replace)

Each ``iter_N`` is a Megatron dist-checkpointing (torch_dist) directory plus our
``rnope_manifest.json``: the size of every file in it, written after all ranks finished.
A checkpoint is *complete* when every file the manifest lists is there with its size
(older checkpoints without a manifest: when Megatron's ``metadata.json`` and torch's
``.metadata`` exist). A save writes ``iter_N.tmp/`` on every rank, barriers, then rank 0
writes the manifest, renames it to ``iter_N/`` and atomically replaces ``latest``: a crash
or a full disk at any point leaves ``latest`` naming an older, complete checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import shutil

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from rnope_megatron.checkpoint import writer_queue
from rnope_megatron.common import faults
from rnope_megatron.common.errors import UserError

LATEST = "latest"
# What reading or writing a checkpoint can raise: torch's CheckpointException (which
# collects every rank's failure) derives from BaseException, not Exception.
FAILURES = (Exception, CheckpointException)
MANIFEST = "rnope_manifest.json"
_ITERATION = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the one-line message names it and what to do."""


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _iteration_of(path: pathlib.Path) -> int | None:
    match = _ITERATION.match(path.name)
    return int(match.group(1)) if match else None


def incomplete_reason(path: pathlib.Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is."""
    if not path.is_dir():
        return "it does not exist"
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return f"{MANIFEST} is unreadable"
        for name, size in sorted(files.items()):
            found = path / name
            if not found.is_file():
                return f"{name} is missing"
            if found.stat().st_size != size:
                return f"{name} is truncated ({found.stat().st_size} of {size} bytes)"
        return None
    for name in ("metadata.json", ".metadata"):  # written before manifests existed
        if not (path / name).is_file():
            return f"{name} is missing"
    return None


def complete_checkpoints(directory) -> list[pathlib.Path]:
    """The complete ``iter_N`` checkpoints in ``directory``, oldest first."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _iteration_of(p) is not None and incomplete_reason(p) is None]
    return sorted(found, key=_iteration_of)


def _alternatives(directory: pathlib.Path, exclude: pathlib.Path | None = None, marker=None) -> str:
    """What else the directory offers (and, given the marker, how to switch to it)."""
    others = [p.name for p in complete_checkpoints(directory) if p != exclude]
    if not others:
        return "no complete checkpoint is there" + (f" (remove {marker} to start over)" if marker else "")
    return f"complete checkpoints there: {', '.join(others)}" + (
        f": write one of their names into {marker}" if marker else "")


def latest_checkpoint(directory) -> pathlib.Path | None:
    """The checkpoint ``latest`` points to, or None when there is no marker. A marker that
    does not name a complete checkpoint is a :class:`CheckpointError`."""
    directory = pathlib.Path(directory)
    marker = directory / LATEST
    if not marker.is_file():
        return None
    try:
        name = marker.read_text(encoding="utf-8").strip()
    except (UnicodeDecodeError, OSError):
        name = ""
    if _ITERATION.match(name) is None:
        raise CheckpointError(f"{marker} does not name a checkpoint (expected iter_NNNNNNN); "
                              f"{_alternatives(directory, marker=marker)}")
    target = directory / name
    reason = incomplete_reason(target)
    if reason is not None:
        raise CheckpointError(f"{marker} names {target}, which is not a complete checkpoint ({reason}); "
                              f"{_alternatives(directory, target, marker)}")
    return target


def resolve(path) -> pathlib.Path:
    """A checkpoint directory: ``iter_N`` itself, or a directory holding ``latest``."""
    path = pathlib.Path(path)
    if (path / "metadata.json").is_file() or _iteration_of(path) is not None:
        reason = incomplete_reason(path)
        if reason is not None:
            raise CheckpointError(f"{path} is not a complete checkpoint ({reason}); "
                                  f"{_alternatives(path.parent, path)}")
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise CheckpointError(f"{path}: no checkpoint (neither an iter_N directory nor a 'latest' marker)")
    return found


def common_state(path) -> dict:
    """The non-tensor part of a checkpoint (recipe, train state, ...)."""
    from megatron.core import dist_checkpointing

    path = resolve(path)
    try:
        return dist_checkpointing.load_common_state_dict(str(path))
    except FAILURES as err:  # torch/Megatron raise many types for a damaged file
        raise unreadable(path, err) from None


def saved_recipe(path) -> dict:
    """The recipe dict saved with the checkpoint (at least its ``model`` section)."""
    common = common_state(path)
    if "recipe" not in common:
        raise CheckpointError(f"{path}: checkpoint has no recipe (not written by rnope-train / rnope-convert)")
    return common["recipe"]


def _failures_of(err: BaseException) -> list[BaseException]:
    """The per-rank errors a torch DCP CheckpointException collects ({rank: (error, trace)})."""
    failures = getattr(err, "failures", None)
    if not isinstance(failures, dict):
        return []
    found = []
    for value in failures.values():
        error = value[0] if isinstance(value, tuple) and value else value
        if isinstance(error, BaseException):
            found.append(error)
    return found


def root_error(err: BaseException) -> BaseException:
    """The first underlying error: through per-rank failures and ``raise ... from``."""
    while True:
        inner = _failures_of(err) or [e for e in (err.__cause__,) if e is not None]
        if not inner:
            return err
        err = inner[0]


def unreadable(path: pathlib.Path, err: BaseException) -> CheckpointError:
    """The one-line error for a checkpoint that failed to load."""
    root = root_error(err)
    detail = " ".join(str(root).split())[:300]
    return CheckpointError(f"{path} could not be read ({type(root).__name__}: {detail}); "
                           f"{_alternatives(path.parent, path)}")


# ------------------------------------------------------------------------------ saving

def _os_error_in(err: BaseException) -> OSError | None:
    """The operating-system error behind a (possibly wrapped, possibly per-rank) failure."""
    stack, seen = [err], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno:
            return current
        stack += [current.__cause__, current.__context__, *_failures_of(current)]
        stack += [a for a in getattr(current, "args", ()) if isinstance(a, BaseException)]
    return None


def _free_bytes(path: pathlib.Path) -> int | None:
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


# Below this much free space a failed write is taken for a full disk: torch's writer
# reports a short write ("unexpected pos ...") without the ENOSPC behind it.
NEARLY_FULL = 1 << 20


def _save_failure(err: BaseException, tmp: pathlib.Path, directory: pathlib.Path, free: int | None,
                  removed: bool = True) -> CheckpointError:
    """The one-line error for a failed save; ``free`` was measured before cleaning up."""
    os_error = _os_error_in(err)
    text = " ".join(str(err).split())
    full = (os_error is not None and os_error.errno == errno.ENOSPC) or os.strerror(errno.ENOSPC) in text \
        or (free is not None and free < NEARLY_FULL)
    if full:
        what = f"no space left on device while writing checkpoint {tmp}"
        if free is not None:
            what += f" ({free / 2**20:,.1f} MiB free on that file system)"
    elif os_error is not None:
        what = f"writing checkpoint {tmp} failed: {os_error.strerror} ({os_error.filename or tmp})"
    else:
        what = f"writing checkpoint {tmp} failed ({type(err).__name__}: {text[:300]})"
    try:
        kept = latest_checkpoint(directory)
    except CheckpointError:
        kept = None
    left = "the partial checkpoint was removed and " if removed else ""
    return CheckpointError(f"{what}; {left}"
                           + (f"'latest' names {kept.name}" if kept else "no earlier checkpoint exists"))


def _write_manifest(path: pathlib.Path, iteration: int) -> None:
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file() and p.name != MANIFEST}
    with open(path / MANIFEST, "w") as f:
        json.dump({"iteration": iteration, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _replace_marker(directory: pathlib.Path, name: str) -> None:
    marker_tmp = directory / (LATEST + ".tmp")
    with open(marker_tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    marker_tmp.replace(directory / LATEST)


def save_state(state: dict, directory, iteration: int, keep: int) -> pathlib.Path:
    """Write a sharded state dict as ``iter_N`` (atomically, see module docstring) and
    keep it and the ``keep - 1`` complete checkpoints before it. On failure the partial
    ``iter_N.tmp`` is removed and every rank raises the same one-line
    :class:`CheckpointError` saying why and what is left."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    directory = pathlib.Path(directory)
    final = directory / iteration_dir_name(iteration)
    tmp = directory / (final.name + ".tmp")
    rank0 = dist.get_rank() == 0
    if rank0:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    writer_queue.install()  # no multiprocessing Manager behind the writer (see writer_queue)
    try:  # collective: a failure on any rank reaches every rank through Megatron
        dist_checkpointing.save(state, str(tmp), sharded_strategy=get_default_save_sharded_strategy("torch_dist"))
    except FAILURES as err:
        free = _free_bytes(tmp)
        dist.barrier()
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_failure(err, tmp, directory, free) from None
    dist.barrier()
    faults.point("mid_save", iteration)
    error = _finish_on_rank0(tmp, final, directory, iteration, keep) if rank0 else None
    shared = [error]
    dist.broadcast_object_list(shared, src=0)  # rank 0's outcome, so no rank waits for a failed one
    if shared[0] is not None:
        raise CheckpointError(shared[0])
    faults.point("after_save", iteration)
    return final


def _finish_on_rank0(tmp: pathlib.Path, final: pathlib.Path, directory: pathlib.Path, iteration: int,
                     keep: int) -> str | None:
    """Manifest, rename, marker, pruning; the one-line error, or None."""
    try:
        _write_manifest(tmp, iteration)
    except OSError as err:  # a disk that filled while the last shard landed
        free = _free_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        return str(_save_failure(err, tmp, directory, free))
    try:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _replace_marker(directory, final.name)
        _prune(directory, keep, iteration)
    except OSError as err:  # e.g. the marker's few bytes on a disk that just filled
        return str(_save_failure(err, final, directory, _free_bytes(directory), removed=False))
    return None


def _prune(directory: pathlib.Path, keep: int, current: int) -> None:
    """Keep the checkpoint just written and the ``keep - 1`` complete ones before it.
    Checkpoints numbered above it (a run rolled back by pointing ``latest`` at an older
    one) are left alone: they are another history, not older saves of this one."""
    earlier = [p for p in complete_checkpoints(directory) if _iteration_of(p) < current]
    for old in earlier[:len(earlier) - (keep - 1)] if keep > 1 else earlier:
        shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob("iter_*.tmp"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)
