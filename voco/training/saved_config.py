"""Reading a run's ``config.json`` back for ``--resume`` (and the configuration a checkpoint
carries), checked field by field against the configuration class it was written from.

The file sits in a folder the user names, so it may be anything: truncated, edited by hand, another
command's, another program's. Every such file is refused with one line that names it and the first
field at fault, before the run uses a single value from it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

from ..errors import VocoInputError


def read_saved_config(path: Path, config_class, command: str) -> dict:
    """The values of ``path``, a JSON object whose keys and value types are those of the dataclass
    ``config_class`` (JSON lists stand for tuples); nested dataclasses are checked the same way."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise VocoInputError(f"--resume: invalid JSON: {error.msg} (line {error.lineno}, column {error.colno})",
                             path) from None
    except (OSError, UnicodeDecodeError) as error:
        raise VocoInputError(f"--resume: cannot be read: {error}", path) from None
    return checked_config(values, config_class, command, path, "--resume: ")


def checked_config(values, config_class, command: str, path: Path, context: str = "") -> dict:
    """``values`` (a run's configuration, from its config.json or its checkpoint), or one error
    line naming ``path`` and the first field that does not fit ``config_class``."""
    problem = _mismatch(values, config_class)
    if problem:
        raise VocoInputError(f"{context}not the configuration of a voco {command} run ({problem})", path)
    return values


def _mismatch(values, config_class, where: str = "") -> str | None:
    """What keeps ``values`` from being a ``config_class``, or None."""
    if not isinstance(values, dict):
        return f"{where[:-1] or 'the file'} is not a JSON object"
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        return f"unknown setting {where}{unknown[0]!r}"
    missing = [name for name, field in fields.items() if name not in values
               and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]
    if missing:
        return f"no {where}{missing[0]!r}"
    hints = typing.get_type_hints(config_class)
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            problem = _mismatch(value, hints[name], f"{where}{name}.")
            if problem:
                return problem
        elif not _fits(value, hints[name]):
            return f"{where}{name} is {json.dumps(value)[:40]}"
    return None


def _fits(value, hint) -> bool:
    """Whether the JSON value ``value`` can stand for a value of type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):  # a list in JSON, a tuple in a checkpoint
            return False
        if origin is tuple and Ellipsis not in args:
            return len(value) == len(args) and all(map(_fits, value, args))
        return all(_fits(item, args[0]) for item in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)
