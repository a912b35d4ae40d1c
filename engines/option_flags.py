"""Command lines from ``option()`` fields: a frozen config class declares each setting once (its
default, help, group and range), and its parser and its instance are made from those fields.

The server's ``yayi-serve`` (server/cli.py, ServerConfig and every engine's Options) and the load
tools' drivers (``yayi-compare``'s CompareConfig, the eval driver's EvalConfig) are built this way:

    @dataclass(frozen=True)
    class ToolConfig:
        users: tuple[int, ...] = flag_option((1, 4), "concurrencies, e.g. 1,4", parse=parse_users)
        duration: float = flag_option(60.0, "seconds per step", positive=True)

    config = parse_config(ToolConfig, argv, prog="yayi-tool", description="...")

A field without help (a plain default) is no flag: what the program derives later (a resolved
path) lives there and is set with ``dataclasses.replace``, so the config is never mutated.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import TypeVar

from engines import options
from engines.options import option

Config = TypeVar("Config")


def flag_option(
    default,
    help: str,
    *,
    parse: Callable[[str], object] | None = None,
    repeat: bool = False,
    metavar: str | None = None,
    **kwargs,
):
    """``option()`` for what a tool's flag takes beyond a number, a string or a switch: ``parse``
    turns the flag's text into the field's value (raising ``argparse.ArgumentTypeError`` with the
    reason), ``repeat`` collects every use of the flag into a tuple, ``metavar`` names its value in
    ``--help``.  The rest are ``option()``'s (choices, flag, group, minimum, maximum, positive)."""
    declared = option(default, help, **kwargs)
    metadata = {**declared.metadata, "parse": parse, "repeat": repeat, "metavar": metavar}
    return dataclasses.field(default=default, metadata=metadata)


def is_flag(field: dataclasses.Field) -> bool:
    """A field made with option() or flag_option(); others are set by the program, not the command line."""
    return "help" in field.metadata


def add_flag(group, options_class: type, field, dest: str, default, choices=None, help_suffix: str = "") -> None:
    """One option() field as a flag: the same for the server's config, every engine's options and the tools'."""
    flag = options.flag(field.name, options_class)
    help_text = field.metadata.get("help", "") + help_suffix
    choices = choices or field.metadata.get("choices")
    parse = field.metadata.get("parse")
    metavar = field.metadata.get("metavar")
    if parse is not None or field.metadata.get("repeat"):
        extra: dict = {"metavar": metavar} if metavar else {}
        if field.metadata.get("repeat"):
            extra.update(action="append", default=[])
        else:
            extra["default"] = default
        group.add_argument(flag, dest=dest, type=parse or str, help=help_text, **extra)
        return
    if options.is_tristate(options_class, field.name):
        group.add_argument(
            flag,
            dest=dest,
            default=default,
            choices=list(options.TRISTATE),
            type=str.lower,
            help=f"{help_text} (default auto)",
        )
        return
    kind = options.value_type(options_class, field.name)
    if kind is bool:
        group.add_argument(flag, dest=dest, default=default, action="store_true", help=help_text)
        return
    shown = field.default
    if shown is not None and shown != "" and "(default" not in help_text:
        help_text += f" (default {shown:g})" if isinstance(shown, float) else f" (default {shown})"
    extra = (
        {"choices": list(choices)}
        if choices
        else {"metavar": metavar or field.name.removesuffix("_s").split("_")[-1].upper()}
    )
    group.add_argument(flag, dest=dest, default=default, type=kind, help=help_text, **extra)


def build_parser(config_class: type, prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with one flag per option() field of ``config_class``, in declaration order, under
    its group's heading."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    groups: dict[str | None, argparse._ActionsContainer] = {None: parser}
    for field in dataclasses.fields(config_class):
        if not is_flag(field):
            continue
        group = field.metadata.get("group")
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        add_flag(groups[group], config_class, field, dest=field.name, default=field.default)
    return parser


def config_from_args(config_class: type[Config], args: argparse.Namespace) -> Config:
    """The frozen config from parsed flags, lists made tuples so nothing can change them; a value
    outside its field's declared range is a ValueError naming the flag."""
    values = {}
    for field in dataclasses.fields(config_class):  # type: ignore[arg-type]
        if not is_flag(field):
            continue
        value = getattr(args, field.name)
        if isinstance(value, list):
            value = tuple(value)
        elif options.is_tristate(config_class, field.name) and isinstance(value, str):
            value = options.TRISTATE[value]
        if not field.metadata.get("parse") and not field.metadata.get("repeat"):
            why = options.out_of_range(config_class, field.name, value)
            if why is not None:
                raise ValueError(f"{options.flag(field.name, config_class)} {why}")
        values[field.name] = value
    return config_class(**values)


def parse_config(config_class: type[Config], argv: list[str] | None, prog: str, description: str) -> Config:
    """``argv`` (None: the process's) as a ``config_class``, through the parser its fields make; a
    refused value exits as argparse does (status 2, ``prog: error: ...``)."""
    parser = build_parser(config_class, prog, description)
    args = parser.parse_args(argv)
    try:
        return config_from_args(config_class, args)
    except ValueError as exc:
        parser.error(str(exc))
