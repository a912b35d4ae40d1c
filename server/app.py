"""Wiring: the gRPC server with health and reflection, the HTTP front end, the engine, metrics, signals.

``serve`` is four named steps of a ``Server``: build (the engine, not loaded, and the gRPC
server with its services), bind (every port), warn (an open port off loopback), and run until
a signal (load, serve, drain, stop).  Start-up order matters to probes: the ports are bound and
health answers NOT_SERVING first (gRPC health and HTTP /health read the one ServingState,
server/serving_state.py), the model loads, and only then does health turn SERVING.  On SIGTERM
or SIGINT the order reverses: NOT_SERVING, no new work on either front end, in-flight calls get
the grace period, the engine shuts down, exit 0.  A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engines.base import EngineConfig
from engines.registry import create_engine
from server.auth import TokenAuth
from server.calls import Calls
from server.config import ServerConfig
from server.device_sampler import DeviceSampler, make_probe
from server.grpc.gate import RequestGate
from server.grpc.health import BoundedHealth
from server.grpc.servicer import InferenceServicer
from server.grpc.wire import SERVICE_NAME, pb_grpc
from server.metrics import ServerMetrics
from server.serving_state import ServingState
from server.tls import TLSConfigError, server_credentials

log = logging.getLogger("yayi-serve")

ENGINE_POLL_S = 1.0
LOOPBACK = ("127.0.0.1", "::1", "localhost")
STATUS_FLUSH_S = 2.0


class StartupError(RuntimeError):
    """A failure a person fixes by changing the command line or the machine: no traceback needed."""


def _chat_template(path: str | None) -> str | None:
    """The text of --chat-template FILE, checked to be Jinja before anything loads."""
    if path is None:
        return None
    import jinja2

    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"--chat-template {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise StartupError(f"--chat-template {path}: not a Jinja template (line {exc.lineno}: {exc.message})") from None
    return text


async def serve(config: ServerConfig, announce=print) -> int:
    """The server's life in its named steps; see the module's docstring for the order probes see."""
    server = Server.build(config)
    await server.bind()
    server.warn()
    server.announce_ports(announce)
    return await server.run_until_signal(announce)


class Server:
    """One server: its engine, both front ends, metrics and the ServingState they read."""

    def __init__(self, config: ServerConfig, engine, metrics: ServerMetrics) -> None:
        self.config, self.engine, self.metrics = config, engine, metrics
        self.state = ServingState()
        self.calls = Calls(engine, metrics, self.state)
        self.auth = TokenAuth(config.auth_token) if config.auth_token else None
        self.health = BoundedHealth(config.max_health_watchers)
        self.state.on_change(self.health.show)
        self.grpc = self._grpc_server()
        self.http = None  # HttpServer once bound, with --http-port
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self.sampler: DeviceSampler | None = None

    @classmethod
    def build(cls, config: ServerConfig) -> Server:
        """The engine (not loaded yet), its metrics and the gRPC server with its services: nothing bound."""
        engine = create_engine(
            config.engine,
            EngineConfig(
                model=config.model,
                dtype=config.dtype,
                device=config.device,
                max_concurrency=config.max_concurrency,
                max_queue=config.max_queue,
                max_queue_wait_s=config.max_queue_wait_s,
                options=config.engine_options,
                engine_process=config.engine_process,
                trust_remote_code=config.trust_remote_code,
                chat_template=_chat_template(config.chat_template),
                memory_budget=config.memory_budget,
                skip_memory_check=config.skip_memory_check,
                test_faults=config.test_faults,
            ),
        )
        return cls(config, engine, ServerMetrics(engine=config.engine, model=config.model))

    def _grpc_server(self) -> grpc.aio.Server:
        config = self.config
        servicer = InferenceServicer(self.calls, config.stream_stall_timeout_s, config.expose_model_path)
        server = grpc.aio.server(
            interceptors=[RequestGate(self.metrics.count_request, self.auth)],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", config.max_receive_bytes),
                ("grpc.max_concurrent_streams", config.max_concurrent_streams),
                ("grpc.so_reuseport", 0),  # two servers must never share a port by accident
            ],
        )
        pb_grpc.add_InferenceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection([SERVICE_NAME, "grpc.health.v1.Health", reflection.SERVICE_NAME], server)
        return server

    async def bind(self) -> None:
        """Health NOT_SERVING, then every port bound and listening (gRPC, HTTP, metrics) before the model
        loads, so a probe gets an answer from the start.  A port that cannot be had is a StartupError."""
        config = self.config
        await self.state.loading()
        address = f"{config.host}:{config.port}"
        try:
            if config.tls_cert:
                self.grpc_port = self.grpc.add_secure_port(
                    address, server_credentials(config.tls_cert, config.tls_key or "", config.tls_client_ca)
                )
            else:
                self.grpc_port = self.grpc.add_insecure_port(address)
        except TLSConfigError as exc:
            raise StartupError(str(exc)) from None
        except RuntimeError as exc:
            raise StartupError(
                f"cannot bind gRPC to {config.host}:{config.port} ({exc}); is the port in use?"
            ) from None
        self.http = _http_server(config, self.calls, self.auth) if config.http_port is not None else None
        await self.grpc.start()
        if self.http is not None:
            await self.http.start()
        if config.metrics_enabled:
            self.metrics_port = self.metrics.serve(config.metrics_host, config.metrics_port)

    def warn(self) -> None:
        """A log warning when a port off loopback is open to anyone, or its token crosses in plaintext."""
        config = self.config
        if config.host in LOOPBACK:
            return
        if config.auth_token and not config.tls_cert:
            log.warning("token auth without TLS on %s: the token crosses the network in plaintext", config.host)
        elif not config.auth_token and not config.tls_client_ca:
            log.warning(
                "gRPC%s listens on %s without a token or client certificates: anyone who can reach the port "
                "can use the model; see --auth-token-file, --tls-cert, or --host 127.0.0.1",
                " and HTTP" if self.http is not None else "",
                config.host,
            )

    def announce_ports(self, announce) -> None:
        """One line with every port, so a script that reads it knows them all
        (loadtest/launch/server_process.py), and one with the security in force."""
        config = self.config
        announce(
            f"yayi-serve: grpc listening on {config.host}:{self.grpc_port}"
            + (
                f", metrics on http://{config.metrics_host}:{self.metrics_port}/metrics"
                if self.metrics_port is not None
                else ""
            )
            + (f", http on {self.http.scheme}://{config.host}:{self.http.port}/v1" if self.http is not None else "")
        )
        announce(f"yayi-serve: security: {_describe_security(config)}")

    async def run_until_signal(self, announce) -> int:
        """Loads the model, serves until SIGTERM or SIGINT, drains, and stops everything: exit 0.
        A signal while the model loads stops the load and exits 0 as well."""
        stop = asyncio.Event()
        _install_signal_handlers(stop)
        try:
            if not await self._load(stop):
                return 0
            await self.state.ready()
            engine_watch = asyncio.ensure_future(_watch_engine(self.engine, self.state))
            info = self.engine.info()
            announce(
                f"yayi-serve: ready: engine={info.engine} model={info.model} device={info.device} "
                f"dtype={info.dtype} attention={info.attention} use_cache={info.use_cache}"
                + (f" custom_code={','.join(info.custom_code)}" if info.custom_code else "")
            )
            if info.custom_code:
                log.warning("the model's own code ran (--trust-remote-code): %s", ", ".join(info.custom_code))
            await stop.wait()
            engine_watch.cancel()
            await self._drain(announce)
            return 0
        finally:
            await self._close()

    async def _load(self, stop: asyncio.Event) -> bool:
        """The engine's start, raced against a stop signal; true when it loaded.  Metrics and the device
        sampler begin once it has."""
        loading = asyncio.ensure_future(self.engine.start())
        await asyncio.wait([loading, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():
            loading.cancel()
            return False
        loading.result()
        info = self.engine.info()
        self.metrics.set_engine_info(info)
        self.metrics.watch_load(self.engine.load)
        if self.config.metrics_enabled:
            self.sampler = DeviceSampler(
                make_probe(info.device), self.metrics.record_device, self.config.device_sample_period_s
            )
            self.sampler.start()
        return True

    async def _drain(self, announce) -> None:
        """NOT_SERVING, no new work on either front end, then the grace period for calls in flight."""
        grace = self.config.grace_period_s
        announce(f"yayi-serve: draining (grace {grace:g}s)")
        await self.state.drain()
        # Our own drain rather than server.stop(grace): during it, new calls on either front end
        # get a clear UNAVAILABLE (HTTP 503) instead of grpc's bare CANCELLED or a refused connection.
        drained = await self.calls.wait_for_in_flight(grace)
        announce(
            "yayi-serve: drained, exiting"
            if drained
            else f"yayi-serve: grace period over, cancelling {self.calls.in_flight} calls"
        )

    async def _close(self) -> None:
        """Both front ends stopped, then the engine, the sampler and metrics."""
        # A short grace, not 0: our count of calls in flight drops when a handler returns, a moment
        # before grpc has sent that call's status, and stop(0) could cut the last status off.
        await self.grpc.stop(STATUS_FLUSH_S)
        if self.http is not None:
            await self.http.stop()
        await self.engine.shutdown()
        if self.sampler is not None:
            self.sampler.stop()
        self.metrics.stop()


def _describe_security(config: ServerConfig) -> str:
    transport = ("TLS with client certificates" if config.tls_client_ca else "TLS") if config.tls_cert else "plaintext"
    return transport + (", token auth" if config.auth_token else ", no auth")


async def _watch_engine(engine, state: ServingState) -> None:
    """Turns health NOT_SERVING for good once the engine says it cannot recover.

    The shared call path reports a request whose failure left the engine unhealthy before that
    request's error leaves, so a client that then asks health already reads NOT_SERVING; the
    poll catches what no request saw (a vLLM engine process that died while idle).  The
    server stays up so probes and logs can say why, and later calls get UNAVAILABLE with it.
    """
    while engine.healthy:
        await asyncio.sleep(ENGINE_POLL_S)
    await state.lose_engine()


def _http_server(config: ServerConfig, calls: Calls, auth: TokenAuth | None):
    """The OpenAI-compatible front end; imported only when asked for, so a gRPC-only server never loads it."""
    from server.http.app import HttpFrontEnd
    from server.http.limits import ConnectionLimits
    from server.http.server import HttpBindError, HttpServer

    front = HttpFrontEnd(
        calls,
        config.model,
        auth,
        config.stream_stall_timeout_s,
        config.max_receive_bytes,
        read_timeout_s=config.http_read_timeout_s,
        max_requests=config.max_concurrent_rpcs,
    )
    limits = ConnectionLimits(
        max_connections=config.http_max_connections,
        read_timeout_s=config.http_read_timeout_s,
        max_head_bytes=config.http_max_header_bytes,
        on_close=calls.metrics.count_http_close,
    )
    assert config.http_port is not None  # called only with the front end asked for
    try:
        return HttpServer(
            front,
            config.host,
            config.http_port,
            config.tls_cert,
            config.tls_key,
            config.tls_client_ca,
            limits=limits,
        )
    except HttpBindError as exc:
        raise StartupError(str(exc)) from None


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            print("yayi-serve: second signal, exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
