"""Typed construction of config dataclasses from plain mappings (YAML sections).

Unknown keys and wrongly typed values are errors naming their dotted path
(``model.hiden_size``, ``train.iters: expected int``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args, get_origin, get_type_hints

from rnope_megatron.common.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the field."""


def check_value(path: str, value: Any, annotation) -> Any:
    """Type-check one leaf against its annotation; ints are accepted for floats."""
    origin = get_origin(annotation)
    if origin is Literal:
        # YAML 1.1 reads a bare off/on as false/true: give a choice named "off" its name back
        if isinstance(value, bool) and {False: "off", True: "on"}[value] in get_args(annotation):
            return {False: "off", True: "on"}[value]
        if value not in get_args(annotation):
            raise ConfigError(f"{path}: {value!r} is not one of {list(get_args(annotation))}")
        return value
    if origin is not None and type(None) in get_args(annotation):  # Optional[X]
        if value is None:
            return None
        inner = [a for a in get_args(annotation) if a is not type(None)][0]
        return check_value(path, value, inner)
    if dataclasses.is_dataclass(annotation):  # a nested section (train.fp8)
        return build_dataclass(annotation, value, path)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if annotation in (int, float, str, bool) and not (
        isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{path}: expected {annotation.__name__}, got {value!r}")
    if annotation is list and not isinstance(value, list):
        raise ConfigError(f"{path}: expected a list, got {value!r}")
    return value


def build_dataclass(cls, values: dict, path: str):
    """``cls(**values)`` after checking keys and leaf types against ``cls``'s annotations."""
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping, got {values!r}")
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in values:
        if key not in fields:
            raise ConfigError(f"unknown key {path}.{key} (known: {', '.join(sorted(fields))})")
    checked = {key: check_value(f"{path}.{key}", value, hints[key]) for key, value in values.items()}
    try:
        return cls(**checked)
    except ValueError as err:  # the section's own validation (e.g. RNoPEConfig)
        message = str(err)
        raise ConfigError(message if message.startswith(path) else f"{path}: {message}") from None
