"""One engine under a label of its own with extra yayi-serve flags: ``yayi-compare --variant``.

``--variant "vllm-pp2=vllm --pipeline-parallel-size 2"`` defines ``vllm-pp2``, which ``--engines``
may then name beside ``vllm``: its server is ``yayi-serve --engine vllm`` with the flags the
comparison gives every vllm server (dtype, KV cache, context, ``--server-args``) and then the
variant's own, so a flag of the variant wins over the same flag given before it; its rows, raw
files and ratio tables are labelled ``vllm-pp2``.

Where a label stands for a kind of server (its start-up estimate, its memory, its outside
peers) a variant is its engine.  In the ratio tables it is set beside its own engine when both
run (``vllm-pp2`` over ``vllm``: the variant's flags are then the only difference), not beside
the engine's outside peer, which runs without the variant's flags: that ratio would mix two
differences.  ``--baseline auto`` likewise picks peers for the engines named in ``--engines``,
not for variants.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass

from engines.registry import ENGINES
from loadtest.compare.targets import BASELINE_ALIASES, BASELINES, HTTP_SUFFIX

# A label names files under raw/ and is read back from rows: letters, digits, ".", "_", "-".
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


@dataclass(frozen=True)
class Variant:
    label: str
    engine: str
    args: tuple[str, ...]

    def describe(self) -> str:
        """``vllm --pipeline-parallel-size 2``: the engine and the flags the variant adds."""
        return shlex.join([self.engine, *self.args])


def parse_variant(text: str) -> Variant:
    """``LABEL=ENGINE [yayi-serve flags...]``, as argparse's ``type`` for ``--variant``."""
    label, equals, rest = text.partition("=")
    label = label.strip()
    try:
        words = shlex.split(rest)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    if not equals or not label or not words:
        raise argparse.ArgumentTypeError(
            f"takes LABEL=ENGINE [yayi-serve flags...], e.g. 'vllm-pp2=vllm --pipeline-parallel-size 2', got {text!r}"
        )
    engine, *args = words
    if engine not in ENGINES:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if not LABEL.match(label):
        raise argparse.ArgumentTypeError(
            f"label {label!r}: a label is letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    if label in ENGINES or label in BASELINES or label in BASELINE_ALIASES:
        raise argparse.ArgumentTypeError(
            f"label {label!r} already names an engine or an outside server; choose another label"
        )
    if label.endswith(HTTP_SUFFIX):
        raise argparse.ArgumentTypeError(
            f"label {label!r}: labels ending in {HTTP_SUFFIX!r} are the HTTP front end's rows; choose another label"
        )
    return Variant(label, engine, tuple(args))


def by_label(variants: Iterable[Variant]) -> dict[str, Variant]:
    """The variants by label; a label defined twice is an error (ValueError, one line)."""
    found: dict[str, Variant] = {}
    for variant in variants:
        if variant.label in found:
            raise ValueError(f"--variant {variant.label} is defined twice")
        found[variant.label] = variant
    return found


def check_names(names: Iterable[str], variants: dict[str, Variant]) -> None:
    """Every name in --engines is an engine or a defined variant (ValueError, one line)."""
    unknown = [name for name in names if name not in ENGINES and name not in variants]
    if unknown:
        defined = f"; variants defined: {', '.join(variants)}" if variants else ""
        raise ValueError(
            f"--engines: {', '.join(map(repr, unknown))} is neither an engine ({', '.join(ENGINES)}) nor a label "
            f"defined with --variant LABEL=ENGINE [flags...]{defined}"
        )


def check_flags(variant: Variant, model: str) -> None:
    """The variant's flags as yayi-serve's own parser reads them for its engine, so a mistyped flag
    is refused before any server starts (ValueError, one line).  An engine not installed here is
    left to fail at its start, with its row saying why, as the plain engine's would."""
    from engines.registry import EngineNotInstalled, engine_class
    from server.cli import build_parser, engine_options_from_args

    try:
        engine_class(variant.engine)
    except EngineNotInstalled:
        return
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = build_parser().parse_args(["--engine", variant.engine, "--model", model, *variant.args])
            engine_options_from_args(args)
    except SystemExit as exc:
        why = (errors.getvalue().strip().splitlines() or [str(exc)])[-1].removeprefix("yayi-serve: error: ")
        raise ValueError(f"--variant {variant.label}: yayi-serve refuses its flags: {why}") from None
    # The engine is the word before the flags and the model the run's: a flag may not change either.
    if (args.engine, args.model) != (variant.engine, model):
        raise ValueError(
            f"--variant {variant.label}: its flags may not set --engine or --model (the engine is the word "
            f"after '=', the model the run's --model)"
        )


def variant_pairs(variants: Iterable[Variant]) -> list[tuple[str, str, str]]:
    """Each variant against its own engine, as report.VERSUS holds its pairs (ours, theirs, title)."""
    return [
        (v.label, v.engine, f"{v.label} (`{v.describe()}`) against {v.engine} (the same engine without those flags)")
        for v in variants
    ]
