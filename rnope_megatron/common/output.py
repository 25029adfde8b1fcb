"""Every command's outputs, written so that nothing is ever lost (the one staged writer
of rnope-convert, rnope-quantize, rnope-eval and rnope-preprocess).

* **Checked before any work** (:func:`check_file_target`, :func:`check_output`): the
  parent folder exists (or can be created) and is writable, a file target is not a
  directory, no output is, contains or lies inside an input or another output. A user
  never waits for an evaluation or a conversion that cannot be written.
* **A file** (:func:`atomic_file`) is written to ``.NAME.partial-PID`` beside it, flushed
  to disk, then renamed over ``NAME``: a full disk or a kill leaves the previous file
  intact and no empty or truncated file under the final name.
* **A directory** (:func:`staged_output`) is built in ``.OUT.partial-PID`` beside it and
  swapped in when complete; its manifest (:data:`MARKER`) lists every file the tool wrote.
  ``--force`` replaces a previous output of the tool: the files its manifest lists go,
  anything else the user put there (a ``README.md`` model card, ``.git``) is kept, as
  ``save_pretrained`` keeps it. A folder without a manifest is never replaced.
* **SIGTERM / SIGINT** (:func:`signals_clean_up`) unwind the command like an error: every
  staged path is removed and the previous output stays. A partial of a process that
  died anyway (``kill -9``) is swept by the next run that writes the same output.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import threading

MARKER = ".rnope-convert.json"
"""The manifest file of a staged directory: the writing command, its provenance and
``files`` (every path it wrote, relative to the directory). The name predates the other
commands: outputs written by older versions keep being recognised."""


class Interrupted(BaseException):
    """SIGTERM / SIGINT arrived: raised where the command is, so every staged writer on the
    way out removes its partial output. Not an Exception: nothing may swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_unwinding = threading.Event()


def _raise_interrupted(signum, frame):
    if _unwinding.is_set():  # a second signal while cleaning up: let the cleanup finish
        return
    _unwinding.set()
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_clean_up():
    """Within: SIGTERM and SIGINT raise :class:`Interrupted` (where they still have their
    default action; a trainer's own handlers are left alone)."""
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                installed[sig] = signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, previous in installed.items():
            signal.signal(sig, previous)


# ---------------------------------------------------------------- checks before any work

def _overlap(out: pathlib.Path, source: pathlib.Path) -> str | None:
    if out == source:
        return "is"
    if source in out.parents:
        return "is inside"
    if out in source.parents:
        return "contains"
    return None


def _check_writable_parent(out: pathlib.Path, label: str) -> None:
    """The nearest existing ancestor of ``out`` must be a writable directory."""
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{label}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"{label}: folder {ancestor} is not writable")


def check_file_target(path, label: str, inputs=(), others=(), create_parent: bool = False) -> pathlib.Path:
    """Refuse, before any work, a file output ``label`` (``--json``, ``--png``) that cannot
    be written: its folder missing (unless the command creates it: ``create_parent``) or
    read-only, a directory in its place, an input or another output at the same path.
    Returns the path, resolved."""
    target = pathlib.Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{label} {path} is a directory, not a file name")
    if create_parent:
        _check_writable_parent(target, label)
    elif not target.parent.is_dir():
        raise FileNotFoundError(f"{label} {path}: folder {target.parent} does not exist")
    elif not os.access(target.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{label} {path}: folder {target.parent} is not writable")
    resolved = target.resolve()
    for source in inputs:
        if resolved == pathlib.Path(source).resolve():
            raise ValueError(f"{label} {path} would overwrite the input {source}")
    for other_label, other in others:
        if other and pathlib.Path(other).resolve() == resolved:
            raise ValueError(f"{label} and {other_label} name the same file {path}")
    return resolved


def read_manifest(out: pathlib.Path) -> dict | None:
    """The manifest of a previous output, or None (no manifest, or not one of ours)."""
    try:
        manifest = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _tool_files(manifest: dict) -> set[str] | None:
    files = manifest.get("files")
    return set(files) if isinstance(files, list) and all(isinstance(f, str) for f in files) else None


def foreign_entries(out: pathlib.Path, tool: str) -> list[str]:
    """Top-level entries of a previous output ``out`` that its manifest does not list (the
    user's additions, kept by ``--force``). Refuses a folder that mixes both inside one
    subfolder, or whose manifest lists no files (written by an older version)."""
    manifest = read_manifest(out)
    listed = _tool_files(manifest) if manifest else None
    if listed is None:
        raise ValueError(f"{out} has no list of the files {tool} wrote (written by an older version?): "
                         "remove it or choose another directory")
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.name == MARKER:
            continue
        inside = [entry] if not entry.is_dir() or entry.is_symlink() else \
            [p for p in entry.rglob("*") if not p.is_dir() or p.is_symlink()]
        names = {str(p.relative_to(out)) for p in inside}
        if names and not names & listed:
            foreign.append(entry.name)
        elif names - listed:
            stray = sorted(names - listed)[0]
            raise ValueError(f"{out / stray} was not written by {tool} and lies among its files: "
                             "move it out or choose another directory")
    return foreign


def check_output(out_dir, inputs, force: bool, tool: str = "rnope-convert", others=(),
                 label: str = "output") -> pathlib.Path:
    """Refuse, before any work, a directory output that overlaps an input or another
    output (``others``: (label, path) pairs), whose folder is not writable, or that holds
    files ``--force`` may not replace. Returns the output path, resolved."""
    out = pathlib.Path(out_dir).resolve()
    for source in inputs:
        source = pathlib.Path(source).resolve()
        relation = _overlap(out, source)
        if relation:
            raise ValueError(f"{label} {out_dir} {relation} the input {source}: "
                             "choose an output directory outside the input")
    for other_label, other in others:
        if other is None:
            continue
        relation = _overlap(out, pathlib.Path(other).resolve())
        if relation:
            raise ValueError(f"{label} {out_dir} {relation} {other_label} {other}: choose separate directories")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{label} {out_dir} exists and is not a directory")
    _check_writable_parent(out, label)
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ValueError(f"{out_dir} is not empty (use --force to replace a previous {tool} output)")
        if not (out / MARKER).is_file():
            raise ValueError(f"{out_dir} is not empty and was not written by {tool}: --force replaces "
                             f"only a previous {tool} output; choose another directory")
        foreign_entries(out, tool)  # refuses what cannot be kept apart
    return out


# ---------------------------------------------------------------- leftovers of dead runs

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep_stale(target: pathlib.Path) -> None:
    """Remove ``.NAME.partial-PID`` left beside ``target`` by processes that no longer run
    (killed with -9, the machine lost); put a ``.NAME.replaced-PID`` back when a kill came
    between the two renames of a swap."""
    for leftover in target.parent.glob(f".{target.name}.*-*"):
        kind, _, pid = leftover.name[len(target.name) + 2:].rpartition("-")
        if kind not in ("partial", "replaced") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "replaced" and not target.exists():
            leftover.rename(target)  # the previous output, moved aside and never replaced
        else:
            _remove(leftover)


def _final_name(err: OSError, stage: pathlib.Path, out: pathlib.Path) -> OSError:
    """An OSError naming a staged path (or none: a failed write() names no file), renamed
    to the path the user asked for."""
    if not err.filename:
        err.filename = str(out)
    for attr in ("filename", "filename2"):
        name = getattr(err, attr, None)
        if name and str(name).startswith(str(stage)):
            setattr(err, attr, str(out) + str(name)[len(str(stage)):])
    return err


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- writers

@contextlib.contextmanager
def atomic_file(path, label: str = "output"):
    """Yield a temporary path beside ``path`` to write; on success it is flushed to disk and
    renamed over ``path``, on any failure (or SIGTERM) it is removed and ``path`` keeps its
    previous content. Errors name ``path``, not the temporary file."""
    target = pathlib.Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{label} {path} is a directory, not a file name")
    sweep_stale(target)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    try:
        with signals_clean_up():
            yield partial
            _fsync(partial)
            os.replace(partial, target)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise _final_name(err, partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename itself: best effort, as the renames above
        _fsync(target.parent)


def write_text(path, text: str, label: str = "output") -> None:
    """``text`` at ``path``, atomically (:func:`atomic_file`)."""
    with atomic_file(path, label) as partial:
        partial.write_text(text)


def _stage_files(stage: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if not p.is_dir() or p.is_symlink())


def _keep(foreign: list[str], out: pathlib.Path, stage: pathlib.Path, tool: str) -> None:
    """Hard-link (or copy) the user's files of the previous output into the new one: the
    originals stay where they are until the swap is complete."""
    for name in foreign:
        if (stage / name).exists() or (stage / name).is_symlink():
            raise ValueError(f"{out / name} was not written by {tool} but the new output writes {name}: "
                             "move it away or choose another directory")
        source = out / name
        if source.is_dir() and not source.is_symlink():
            shutil.copytree(source, stage / name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, stage / name)


def _link_or_copy(source, target) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@contextlib.contextmanager
def staged_output(out_dir, inputs, force: bool, provenance: dict, tool: str = "rnope-convert", others=()):
    """Yield a temporary directory to write the output into; on success it replaces
    ``out_dir`` with its manifest, keeping the user's own files of a previous output; on
    failure or SIGTERM it is removed and the previous output stays (module docstring)."""
    out = check_output(out_dir, inputs, force, tool, others)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    with signals_clean_up():
        try:
            stage.mkdir()
            yield stage
            manifest = dict(provenance, files=_stage_files(stage))
            (stage / MARKER).write_text(json.dumps(manifest, indent=1) + "\n")
            kept = foreign_entries(out, tool) if out.is_dir() and any(out.iterdir()) else []
            _keep(kept, out, stage, tool)
            if out.exists():
                out.rename(old)  # a previous output of the tool (checked above) or an empty dir
            stage.rename(out)
            if kept:
                print(f"kept {', '.join(kept)} in {out_dir} (not written by {tool})", flush=True)
        except OSError as err:
            _undo(stage, old, out)
            raise _final_name(err, stage, out)
        except BaseException:
            _undo(stage, old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)


def _undo(stage: pathlib.Path, old: pathlib.Path, out: pathlib.Path) -> None:
    shutil.rmtree(stage, ignore_errors=True)
    if old.exists() and not out.exists():  # put the previous output back
        old.rename(out)
