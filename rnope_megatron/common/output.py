"""A converter's output directory, written so that nothing is ever lost.

* The output is built in a temporary directory beside it and moved into place only when
  complete: a failure leaves the previous output (if any) in place and removes the
  temporary directory; a kill leaves the previous output in place too, except in the
  instant between its two final renames (then it is ``.OUT.replaced-PID`` beside it).
* An output that equals, contains or lies inside an input is refused: replacing it would
  destroy the data being converted.
* ``--force`` replaces only a previous output of rnope-convert (recognised by the
  :data:`MARKER` file it writes), never a directory holding anything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil

MARKER = ".rnope-convert.json"


def _overlap(out: pathlib.Path, source: pathlib.Path) -> str | None:
    if out == source:
        return "is"
    if source in out.parents:
        return "is inside"
    if out in source.parents:
        return "contains"
    return None


def check_output(out_dir, inputs, force: bool) -> pathlib.Path:
    """Refuse an output that overlaps an input, or that holds files --force may not
    replace. Returns the output path, resolved."""
    out = pathlib.Path(out_dir).resolve()
    for source in inputs:
        source = pathlib.Path(source).resolve()
        relation = _overlap(out, source)
        if relation:
            raise ValueError(f"output {out_dir} {relation} the input {source}: "
                             "choose an output directory outside the input")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out_dir} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ValueError(f"{out_dir} is not empty (use --force to replace a previous rnope-convert output)")
        if not (out / MARKER).is_file():
            raise ValueError(f"{out_dir} is not empty and was not written by rnope-convert: --force replaces "
                             "only a previous rnope-convert output; choose another directory")
    return out


@contextlib.contextmanager
def staged_output(out_dir, inputs, force: bool, provenance: dict):
    """Yield a temporary directory to write the output into; on success it replaces
    ``out_dir`` (with the provenance marker), on failure it is removed."""
    out = check_output(out_dir, inputs, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    try:
        yield stage
        (stage / MARKER).write_text(json.dumps(provenance, indent=1) + "\n")
        if out.exists():
            out.rename(old)  # a previous rnope-convert output (checked above) or an empty dir
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if old.exists() and not out.exists():  # put the previous output back
            old.rename(out)
        raise
