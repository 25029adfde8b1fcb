"""The recipes shipped with the package, by name: ``8b/128k`` (``<scale>/<stage>``),
``tiny-cpu``.

The repository's top-level ``recipes/`` folder is installed as the data package
``rnope_megatron.recipes`` (``setup.py``'s ``package_dir``), so a wheel carries every
recipe and section file and an editable install reads the checkout's folder. A recipe is
taken as a path first (a file that exists wins); otherwise as the name of a shipped recipe.
Section files (``models/``, ``data/``) are not recipes: recipes name them.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import pathlib

from rnope_megatron.recipe.loading import load_recipe
from rnope_megatron.recipe.sections import RecipeError

PACKAGE = "rnope_megatron.recipes"
SECTION_FOLDERS = ("models", "data")
"""Folders of section files (``model: models/paper-8b.yaml``), not recipes."""
SUFFIX = ".yaml"


def shipped_dir() -> pathlib.Path:
    """The folder of shipped recipes (inside the installed package, or the checkout's
    ``recipes/`` under an editable install)."""
    try:
        folder = importlib.resources.files(PACKAGE)
    except ModuleNotFoundError:
        raise RecipeError(f"no shipped recipes: the {PACKAGE} data package is not installed "
                          "(reinstall rnope-megatron: pip install -e . or the wheel)") from None
    # a real directory: base: chains and section files are read relative to each file
    return pathlib.Path(str(folder))


def _name_of(path: pathlib.Path, root: pathlib.Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def shipped_paths() -> dict[str, pathlib.Path]:
    """Every shipped recipe: name -> file, sorted by name."""
    root = shipped_dir()
    found = {}
    for path in root.rglob(f"*{SUFFIX}"):
        if path.relative_to(root).parts[0] in SECTION_FOLDERS:
            continue
        found[_name_of(path, root)] = path
    return dict(sorted(found.items()))


def resolve(name_or_path, option: str = "recipe") -> pathlib.Path:
    """The recipe file ``name_or_path`` means: a file that exists wins; else a shipped
    recipe's name (``8b/128k``, ``tiny-cpu``; a ``.yaml`` ending is allowed). An unknown
    name is a :class:`RecipeError` naming the closest shipped names."""
    path = pathlib.Path(name_or_path)
    if path.is_file():
        return path
    text = str(name_or_path).strip().removesuffix(SUFFIX)
    shipped = shipped_paths()
    if text in shipped:
        return shipped[text]
    close = difflib.get_close_matches(text, list(shipped), n=4, cutoff=0.5)
    hint = f"close: {', '.join(close)}" if close else "none is close"
    raise RecipeError(f"{option} file not found: {name_or_path}, and no shipped recipe has that name "
                      f"({hint}; --list-recipes lists them)")


def load(name_or_path, overrides: list[str] = ()):
    """:func:`~rnope_megatron.recipe.loading.load_recipe` of a path or a shipped name."""
    return load_recipe(resolve(name_or_path), overrides)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One shipped recipe as ``--list-recipes`` prints it."""

    name: str
    scale: str
    """The model scale (the recipe's folder: ``8b``), ``-`` for a recipe at the top."""
    stage: str
    """The training stage (the file name: ``pretrain-8k``, ``128k``)."""
    seq_length: int
    cluster: str
    """``nodes x gpus_per_node gpu`` it was planned for, ``-`` when not planned."""


def entries() -> list[Entry]:
    """Every shipped recipe, loaded and validated (a broken one fails here, naming it)."""
    rows = []
    for name, path in shipped_paths().items():
        try:
            recipe = load_recipe(path)
        except RecipeError as err:
            raise RecipeError(f"shipped recipe {name} ({path}): {err}") from None
        scale, _, stage = name.rpartition("/")
        c = recipe.cluster
        cluster = f"{c.nodes} x {c.gpus_per_node} {c.gpu}" if c.nodes is not None else "-"
        rows.append(Entry(name, scale or "-", stage, recipe.train.seq_length, cluster))
    return rows


def render(rows: list[Entry]) -> str:
    """The ``--list-recipes`` table: one recipe per line under a header."""
    header = ("name", "scale", "stage", "seq_length", "cluster (nodes x gpus gpu)")
    cells = [header] + [(r.name, r.scale, r.stage, str(r.seq_length), r.cluster) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)
