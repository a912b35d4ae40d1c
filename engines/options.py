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


def option(default, help: str, *, choices: tuple[str, ...] | None = None):
    """A field of an engine's Options: its default (one place) and the flag's help text.

    ``bool | None`` options take ``auto|true|false`` on the command line (None = auto).
    """
    return field(default=default, metadata={"help": help, "choices": choices})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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


def parse_value(options_class: type, name: str, text: str):
    """One flag's text to the field's type (argparse's ``type=``)."""
    if is_tristate(options_class, name):
        return TRISTATE[text]
    kind = value_type(options_class, name)
    return kind(text)


def describe(options) -> str:
    """``name=value`` pairs for the start-up log."""
    return ", ".join(f"{f.name}={getattr(options, f.name)!r}" for f in dataclasses.fields(options))
