"""Reading a recipe: YAML files, ``base:`` chains, section files, ``a.b=value`` overrides,
then typed sections (:mod:`.sections`) and every check (:mod:`.validation`).

Unknown keys are errors naming their path; ``base: other.yaml`` inherits from another
recipe, which may have a base of its own (a chain such as 128k -> 64k -> ... ->
pretrain-8k; a cycle is an error naming the chain); a section given as a file name
(``model: models/paper-8b.yaml``) is read from that file, relative to the recipe naming it.
A bad recipe fails here in a second, not after the job is scheduled.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
from typing import Any, get_type_hints

import yaml

from rnope_megatron.common import safe_yaml
from rnope_megatron.common.typed import build_dataclass
from rnope_megatron.recipe.sections import Recipe, RecipeError
from rnope_megatron.recipe.validation import validate


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_scalar(dotted: str, text: str) -> Any:
    if text == "":
        return ""
    try:
        return safe_yaml.load(text, f"override {dotted}")
    except safe_yaml.YAMLTooLarge as err:
        raise RecipeError(str(err)) from None
    except yaml.YAMLError as err:
        raise RecipeError(f"override {dotted}: {text!r} is not a YAML value ({' '.join(str(err).split())})") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings (values parsed as YAML scalars/lists)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form section.key=value")
        dotted, text = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = raw
        for key in keys[:-1]:
            if node.get(key) is None:  # absent, or a null section (train.fp8: null) being switched on
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise RecipeError(f"override {dotted}: {key} is not a section")
        node[keys[-1]] = _parse_scalar(dotted, text)
    return raw


def _read_mapping(path: pathlib.Path, what: str) -> dict:
    """A YAML file holding a mapping (an empty file is an empty mapping)."""
    if not path.is_file():
        raise RecipeError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        raw = safe_yaml.load(text, str(path))
    except safe_yaml.YAMLTooLarge as err:
        raise RecipeError(str(err)) from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping of keys, got a {type(raw).__name__}")
    return raw


def _section_files(raw: dict, folder: pathlib.Path) -> dict:
    """Replace sections given as file names by the mappings in those files."""
    return {key: _read_mapping(folder / value, f"section {key!r} file") if isinstance(value, str) and key != "base"
            else value for key, value in raw.items()}


def read_yaml(path, _chain: tuple = ()) -> dict:
    """The raw recipe mapping: the file, its section files and its bases merged (a base
    is read relative to the file naming it; the file's own keys win)."""
    path = pathlib.Path(path)
    chain = _chain + (path,)
    what = f"{_chain[-1]}: base recipe" if _chain else "recipe file"
    raw = _section_files(_read_mapping(path, what), path.parent)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise RecipeError(f"{path}: base must be one recipe file name, got {base!r}")
    base_path = path.parent / base
    if any(base_path.resolve() == seen.resolve() for seen in chain):
        names = " -> ".join(str(p) for p in chain + (base_path,))
        raise RecipeError(f"{path}: base chain is a cycle ({names})")
    return _merge(read_yaml(base_path, chain), raw)


def recipe_from_dict(raw: dict) -> Recipe:
    sections = {f.name: f.type for f in dataclasses.fields(Recipe)}
    hints = get_type_hints(Recipe)
    for key in raw:
        if key not in sections:
            raise RecipeError(f"unknown section {key!r} (known: {', '.join(sections)})")
    built = {}
    for name in sections:
        built[name] = build_dataclass(hints[name], raw.get(name) or {}, name)
    return Recipe(**built)


def load_recipe(path, overrides: list[str] = ()) -> Recipe:
    """Read, inherit, override, type-check and validate a recipe (no process groups)."""
    recipe = recipe_from_dict(apply_overrides(read_yaml(path), list(overrides)))
    validate(recipe)
    return recipe
