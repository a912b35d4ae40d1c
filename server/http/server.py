"""uvicorn serving the HTTP front end on the running event loop, beside the gRPC server.

The same loop as gRPC and the engine: nothing crosses threads, and one drain covers both
front ends.  We bind the socket ourselves, so port 0 gives a port we can announce and a port
in use fails start-up with a plain sentence.  uvicorn's own signal handling is switched off:
app.py owns SIGTERM and SIGINT and drains gRPC and HTTP together before this server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

import uvicorn

from server.http.limits import ConnectionLimits

log = logging.getLogger(__name__)
# uvicorn's start and stop lines would only repeat ours (app.py announces the port); its warnings stay.
logging.getLogger("uvicorn.error").setLevel(logging.WARNING)

# Past the drain (app.py's grace period) what is still open is cancelled after this long.
SHUTDOWN_TIMEOUT_S = 1


class HttpBindError(OSError):
    """The HTTP port could not be bound; the message says which and why."""


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # app.py owns the signals; uvicorn's handlers would replace the loop's and skip our drain.
        yield


class HttpServer:
    def __init__(
        self,
        front,
        host: str,
        port: int,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_client_ca: str | None = None,
        limits: ConnectionLimits | None = None,
    ) -> None:
        limits = limits or ConnectionLimits()
        self._socket = _bind(host, port)
        self.port = self._socket.getsockname()[1]
        self.scheme = "https" if tls_cert else "http"
        self._front = front  # an HttpFrontEnd: its calls are ended, answered, before uvicorn stops
        config = uvicorn.Config(
            front.app,
            interface="asgi3",  # a bound method, which uvicorn's guess takes for ASGI 2
            lifespan="off",
            log_config=None,  # the server's logging as configured by the command line
            access_log=False,  # a line per request would drown the log under load
            ssl_certfile=tls_cert,
            ssl_keyfile=tls_key,
            ssl_ca_certs=tls_client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE,
            # Connections and their heads are bounded in http_limits.py; requests in flight by the
            # front end. uvicorn's own limit counted idle sockets as requests (see http_limits.py).
            http=limits.protocol_class(),
            h11_max_incomplete_event_size=limits.max_head_bytes,
            limit_concurrency=None,
            timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S,
        )
        config.load()  # here, so a certificate uvicorn cannot use fails start-up rather than a task
        self._server = _Server(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it stopped
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is None:
            self._socket.close()
            return
        # Past the drain, the calls still open are ended by the front end, each with its answer (a 503,
        # or a stream's error event), before uvicorn's own shutdown would cancel them mid-word.
        await self._front.end_calls(SHUTDOWN_TIMEOUT_S)
        self._server.should_exit = True
        try:
            await self._task
        except Exception:
            log.exception("HTTP server stopped with an error")


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise HttpBindError(f"cannot bind HTTP to {host}:{port} ({exc})") from None
    try:
        # Reuse of a port in TIME_WAIT only; two live servers still cannot share it (no SO_REUSEPORT).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise HttpBindError(f"cannot bind HTTP to {host}:{port} ({exc.strerror}); is the port in use?") from None
    return sock
