"""Engine options: each engine declares its own, typed, with its command-line flag and one default.

An engine class names a frozen dataclass as ``Options``; each field is made with
``option(...)``.  The command line (server/cli.py) turns every engine's fields into flags
(``max_model_len`` -> ``--max-model-len``) and builds the chosen engine's ``Options`` from
them, so adding an engine with options is still one module and one registry line.  Tools
that need an engine's default (the comparison driver) read it from the same dataclass.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field


@dataclass(frozen=True)
class NoOptions:
    """For engines without options of their own."""


def option(
    default,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    flag: str | None = None,
    group: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
):
    """A field of an engine's Options (or of the server's config): its default (one place), its
    flag's help text and the range the command line holds it to.

    ``flag``: the flag's name when it is not the field's (``grace_period_s`` -> ``--grace-period``);
    ``group``: the heading it is listed under in ``--help``.  ``bool | None`` options take
    ``auto|true|false`` on the command line (None = auto).
    """
    metadata = {
        "help": help,
        "choices": choices,
        "flag": flag,
        "group": group,
        "minimum": minimum,
        "maximum": maximum,
        "positive": positive,
    }
    return field(default=default, metadata=metadata)


def flag(name: str, options_class: type | None = None) -> str:
    """A field's flag: its declared ``flag``, else the field's name (``max_model_len`` -> ``--max-model-len``)."""
    if options_class is not None:
        declared = {f.name: f.metadata.get("flag") for f in dataclasses.fields(options_class)}.get(name)
        if declared:
            return "--" + declared
    return "--" + name.replace("_", "-")


def out_of_range(options_class: type, name: str, value) -> str | None:
    """Why ``value`` is outside the field's declared range, or None."""
    meta = {f.name: f.metadata for f in dataclasses.fields(options_class)}[name]
    if value is None or isinstance(value, bool):
        return None
    low, high = meta.get("minimum"), meta.get("maximum")
    if low is not None and high is not None and not low <= value <= high:
        return f"must be between {low:g} and {high:g}"
    if low is not None and value < low:
        return f"must be at least {low:g}" if low else "must be 0 or more"
    if meta.get("positive") and value <= 0:
        return "must be positive"
    return None


def fields(options_class: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(options_class))


def value_type(options_class: type, name: str) -> type:
    """The field's type without ``| None``: int, float, str or bool."""
    hint = typing.get_type_hints(options_class)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def is_tristate(options_class: type, name: str) -> bool:
    hint = typing.get_type_hints(options_class)[name]
    return value_type(options_class, name) is bool and type(None) in typing.get_args(hint)


TRISTATE = {"auto": None, "true": True, "false": False}
