"""The ``yayi-serve`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from engines import faults, options
from engines.errors import EngineError
from engines.models import ModelNotFound, builtin_models
from engines.option_flags import add_flag
from engines.registry import (
    EngineNotInstalled,
    EngineSettingRefused,
    UnknownEngine,
    check_engine_process,
    child_process_engines,
    engine_class,
    engine_names,
)
from server.app import StartupError, serve
from server.config import SECURITY, ServerConfig

TOKEN_ENV = "YAYI_AUTH_TOKEN"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yayi-serve",
        description="gRPC inference server for causal language models with pluggable engines, "
        "with an optional OpenAI-compatible HTTP front end.",
    )
    groups: dict[str | None, argparse._ActionsContainer] = {None: parser}
    for field in options.fields(ServerConfig):
        if "help" not in field.metadata:
            continue  # not a flag (the token, the engine's options, test faults)
        group = field.metadata["group"]
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        add_flag(
            groups[group],
            ServerConfig,
            field,
            dest=field.name,
            default=field.default,
            **_SERVER_EXTRAS.get(field.name, {}),
        )
    groups[SECURITY].add_argument(
        "--auth-token-file",
        help=f"file holding the bearer token every call but health must send as 'authorization: "
        f"Bearer <token>' (or set {TOKEN_ENV}; never on the command line, where ps shows it)",
    )
    parser.add_argument(
        "--allow-test-faults",
        action="store_true",
        help=f"tests only: honour {faults.ENV_VAR} (engines/faults.py); without this flag the "
        "server refuses to start while that variable is set",
    )
    _add_engine_options(parser)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


# What the registry and the model table add to server flags at run time.
_SERVER_EXTRAS: dict[str, dict] = {
    "engine": {"choices": engine_names()},
    "model": {"help_suffix": f" ({', '.join(builtin_models())} are built in)"},
    "engine_process": {"help_suffix": f"; engines that can: {', '.join(child_process_engines())}"},
}


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Each engine's own flags (its ``Options``), one group per options class.

    Absent flags stay absent (SUPPRESS), so the chosen engine's dataclass supplies its own
    defaults and a flag of another engine can be refused by name.
    """
    seen: dict[type, list[str]] = {}
    for name in engine_names():
        try:
            options_class = engine_class(name).Options
        except EngineNotInstalled:
            continue  # its flags are not offered where it cannot run
        seen.setdefault(options_class, []).append(name)
    for options_class, names in seen.items():
        if not options.fields(options_class):
            continue
        group = parser.add_argument_group(f"{', '.join(names)} engine options")
        for field in options.fields(options_class):
            # Absent flags stay absent (SUPPRESS): the chosen engine's dataclass supplies its defaults.
            add_flag(group, options_class, field, dest=f"option_{field.name}", default=argparse.SUPPRESS)


def engine_options_from_args(args: argparse.Namespace):
    """The chosen engine's Options from the flags given; a flag of another engine is an error."""
    options_class = engine_class(args.engine).Options
    own = {field.name for field in options.fields(options_class)}
    given = {key.removeprefix("option_"): value for key, value in vars(args).items() if key.startswith("option_")}
    for name in given:
        if name not in own:
            raise SystemExit(
                f"yayi-serve: error: {options.flag(name)} is not an option of engine {args.engine}; "
                f"`yayi-serve --help` lists each engine's options"
            )
    values = {
        name: options.TRISTATE[value] if options.is_tristate(options_class, name) else value
        for name, value in given.items()
    }
    try:
        return options_class(**values)
    except ValueError as exc:
        raise SystemExit(f"yayi-serve: error: {exc}") from None


def _test_faults(allowed: bool) -> tuple:
    if faults.ENV_VAR not in os.environ:
        return ()
    if not allowed:
        raise SystemExit(
            f"yayi-serve: error: {faults.ENV_VAR} is set, which lets any prompt fail the engine; "
            "unset it, or pass --allow-test-faults if this is a test"
        )
    try:
        return faults.from_environment()
    except ValueError as exc:
        raise SystemExit(f"yayi-serve: error: {exc}") from None


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    values = {}
    for field in options.fields(ServerConfig):
        if "help" not in field.metadata:
            continue
        value = getattr(args, field.name)
        why = options.out_of_range(ServerConfig, field.name, value)
        if why is not None:
            flag = options.flag(field.name, ServerConfig)
            extra = " (health needs one)" if field.name == "max_concurrent_rpcs" else ""
            raise SystemExit(f"yayi-serve: error: {flag} {why}{extra}")
        values[field.name] = value
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("yayi-serve: error: --tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise SystemExit("yayi-serve: error: --tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if args.engine_process:
        try:
            check_engine_process(args.engine)
        except EngineSettingRefused as exc:
            raise SystemExit(f"yayi-serve: error: {exc}") from None
    return ServerConfig(
        **values,
        auth_token=_auth_token(args.auth_token_file),
        engine_options=engine_options_from_args(args),
        test_faults=_test_faults(args.allow_test_faults),
    )


def _auth_token(path: str | None) -> str | None:
    if path is None:
        token = os.environ.get(TOKEN_ENV)
        source = TOKEN_ENV
    else:
        try:
            token = Path(path).read_text()
        except OSError as exc:
            raise SystemExit(f"yayi-serve: error: --auth-token-file {path}: {exc.strerror}") from None
        source = f"--auth-token-file {path}"
    if token is None:
        return None
    token = token.strip()
    # Header values are printable ASCII without spaces; anything else could never be sent back.
    if not token or not all(33 <= ord(c) <= 126 for c in token):
        raise SystemExit(f"yayi-serve: error: {source}: the token must be non-empty printable ASCII without spaces")
    return token


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    try:
        return asyncio.run(serve(config, announce=lambda line: print(line, flush=True)))
    except (StartupError, EngineNotInstalled, UnknownEngine, ModelNotFound, EngineError, OSError) as exc:
        print(f"yayi-serve: error: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
