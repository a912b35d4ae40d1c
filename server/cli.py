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
from engines.registry import EngineNotInstalled, UnknownEngine, engine_class, engine_names

from .app import StartupError, serve
from .config import ServerConfig

DEFAULTS = ServerConfig()
TOKEN_ENV = "YAYI_AUTH_TOKEN"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yayi-serve",
        description="gRPC inference server for causal language models with pluggable engines, "
        "with an optional OpenAI-compatible HTTP front end.",
    )
    parser.add_argument(
        "--engine", default=DEFAULTS.engine, choices=engine_names(), help="backend (default %(default)s)"
    )
    parser.add_argument(
        "--model",
        default=DEFAULTS.model,
        help=f"a built-in model ({', '.join(builtin_models())}) or a path to a local "
        "Hugging Face causal-LM folder (default %(default)s)",
    )
    parser.add_argument("--host", default=DEFAULTS.host, help="gRPC bind address (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULTS.port, help="gRPC port; 0 picks a free one")
    parser.add_argument(
        "--http-port",
        type=int,
        default=DEFAULTS.http_port,
        help="serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health) "
        "on this port, same host, same engine; 0 picks a free one (default: off)",
    )
    parser.add_argument(
        "--metrics-host",
        default=DEFAULTS.metrics_host,
        help="bind address of /metrics (default %(default)s: loopback only)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULTS.metrics_port,
        help="Prometheus port; 0 picks a free one, -1 turns metrics off (default %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        default=DEFAULTS.dtype,
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype; auto is float32 on CPU, bfloat16 on CUDA",
    )
    parser.add_argument("--device", default=DEFAULTS.device, help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=DEFAULTS.max_concurrency,
        help="requests generated at once (default: 1 for hf-*, vLLM's max_num_seqs for vllm)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULTS.max_queue,
        help="requests that may wait for a slot; beyond it RESOURCE_EXHAUSTED (default %(default)s)",
    )
    parser.add_argument(
        "--grace-period",
        type=float,
        default=DEFAULTS.grace_period_s,
        help="seconds in-flight requests get to finish on SIGTERM (default %(default)s)",
    )
    parser.add_argument(
        "--max-receive-mb",
        type=float,
        default=DEFAULTS.max_receive_bytes / 2**20,
        help="largest request accepted, in MiB (default %(default)g)",
    )
    parser.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=DEFAULTS.max_concurrent_streams,
        help="calls one client connection may have open at once (default %(default)s)",
    )
    parser.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=DEFAULTS.max_concurrent_rpcs,
        help="calls open on the whole server, health included; past it RESOURCE_EXHAUSTED (default %(default)s)",
    )
    parser.add_argument(
        "--stream-stall-timeout",
        type=float,
        default=DEFAULTS.stream_stall_timeout_s,
        help="seconds a stream may wait on a client that reads nothing before it is cancelled "
        "and its slot freed (default %(default)g)",
    )
    parser.add_argument(
        "--expose-model-path",
        action="store_true",
        help="GetModelInfo includes the model's path on the server's disk (default: name only)",
    )
    parser.add_argument(
        "--device-sample-period",
        type=float,
        default=DEFAULTS.device_sample_period_s,
        help="seconds between device memory/utilisation/power readings (default %(default)s)",
    )
    http = parser.add_argument_group("HTTP front end (with --http-port)")
    http.add_argument(
        "--http-read-timeout",
        type=float,
        default=DEFAULTS.http_read_timeout_s,
        help="seconds a connection gets to send a request's line and headers, and then its body; "
        "past it 408 and the connection closes (default %(default)g)",
    )
    http.add_argument(
        "--http-max-header-kb",
        type=int,
        default=DEFAULTS.http_max_header_bytes // 1024,
        help="largest request line plus headers, in KiB; past it 431 (default %(default)s)",
    )
    http.add_argument(
        "--http-max-connections",
        type=int,
        default=DEFAULTS.http_max_connections,
        help="HTTP connections open at once, apart from requests in flight (--max-concurrent-rpcs): at the cap "
        "a new connection closes the oldest idle one, or gets 503 if none is idle (default %(default)s)",
    )
    security = parser.add_argument_group("security")
    security.add_argument("--tls-cert", help="PEM server certificate (chain): serve TLS instead of plaintext")
    security.add_argument("--tls-key", help="PEM private key of --tls-cert")
    security.add_argument("--tls-client-ca", help="PEM CA: clients must present a certificate it signed (mutual TLS)")
    security.add_argument(
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
            help_text = field.metadata.get("help", "")
            common = dict(dest=f"option_{field.name}", default=argparse.SUPPRESS)
            if options.is_tristate(options_class, field.name):
                group.add_argument(
                    options.flag(field.name),
                    choices=list(options.TRISTATE),
                    type=str.lower,
                    help=f"{help_text} (default auto)",
                    **common,
                )
            elif options.value_type(options_class, field.name) is bool:
                group.add_argument(options.flag(field.name), action="store_true", help=help_text, **common)
            else:
                default = "" if field.default is None else f" (default {field.default})"
                group.add_argument(
                    options.flag(field.name),
                    type=options.value_type(options_class, field.name),
                    metavar=field.name.split("_")[-1].upper(),
                    help=help_text + default,
                    **common,
                )


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
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise SystemExit("yayi-serve: error: --max-concurrency must be at least 1")
    if args.max_queue < 0:
        raise SystemExit("yayi-serve: error: --max-queue must be 0 or more")
    if args.max_concurrent_streams < 1:
        raise SystemExit("yayi-serve: error: --max-concurrent-streams must be at least 1")
    if args.max_concurrent_rpcs < 2:
        raise SystemExit("yayi-serve: error: --max-concurrent-rpcs must be at least 2 (health needs one)")
    if args.http_port is not None and not 0 <= args.http_port <= 65535:
        raise SystemExit("yayi-serve: error: --http-port must be between 0 and 65535")
    if args.stream_stall_timeout <= 0:
        raise SystemExit("yayi-serve: error: --stream-stall-timeout must be positive")
    if args.http_read_timeout <= 0:
        raise SystemExit("yayi-serve: error: --http-read-timeout must be positive")
    if args.http_max_header_kb < 1:
        raise SystemExit("yayi-serve: error: --http-max-header-kb must be at least 1")
    if args.http_max_connections < 1:
        raise SystemExit("yayi-serve: error: --http-max-connections must be at least 1")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("yayi-serve: error: --tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise SystemExit("yayi-serve: error: --tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    return ServerConfig(
        engine=args.engine,
        model=args.model,
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        http_port=args.http_port,
        dtype=args.dtype,
        device=args.device,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        grace_period_s=args.grace_period,
        max_receive_bytes=int(args.max_receive_mb * 2**20),
        device_sample_period_s=args.device_sample_period,
        max_concurrent_streams=args.max_concurrent_streams,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        stream_stall_timeout_s=args.stream_stall_timeout,
        http_read_timeout_s=args.http_read_timeout,
        http_max_header_bytes=args.http_max_header_kb * 1024,
        http_max_connections=args.http_max_connections,
        expose_model_path=args.expose_model_path,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
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
