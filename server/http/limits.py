"""What one HTTP connection may hold before it is a request: a deadline, a size, a place.

uvicorn bounds none of it.  Its idle timer starts only after a response, so a socket that
sends nothing (or half a request line, a byte a second) keeps its place for ever, and its
``limit_concurrency`` counts such sockets with the requests in flight: a few hundred of them
answered every real call with 503.  Its default parser (httptools) also buffers a request
head of any size.  So the front end runs uvicorn's h11 protocol (h11 frames HTTP/1.0 bodies
correctly, which httptools' path does not) with three bounds of our own, each a flag:

- ``--http-read-timeout``: a request's head must arrive whole this many seconds after the
  connection opens or the previous response ends; otherwise 408 (or, with nothing sent at
  all, a plain close, as a keep-alive timeout is).  Data arriving does not reset it, so a
  slowloris gains nothing by trickling.  (The body's own deadline is the front end's.)
- ``--http-max-header-kb``: a head larger than this is refused with 431 as it arrives; the
  server never holds more than this plus one socket read of it.
- ``--http-max-connections``: open connections, counted apart from requests in flight.  At
  the cap, a new connection closes the oldest one that has no request in flight, so idle
  sockets can never shut out a caller; only when every connection is working is the new one
  refused, with 503.

Requests in flight are bounded by the front end (``--max-concurrent-rpcs``, a 429), where
they can be counted in ``yayi_requests_total``.  Every answer here is OpenAI's error shape,
written straight to the socket: no request exists yet for h11 to frame a response to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

LINGER_S = 1.0  # how long a refused connection's further bytes are read and dropped before the close

# Why a connection was closed before it made a request; the label of the counter app.py exports.
EVICTED, REFUSED, HEAD_TIMEOUT, HEAD_TOO_LARGE, MALFORMED = (
    "evicted_idle",
    "refused_busy",
    "head_timeout",
    "head_too_large",
    "malformed",
)
CLOSE_REASONS = (EVICTED, REFUSED, HEAD_TIMEOUT, HEAD_TOO_LARGE, MALFORMED)


@dataclass
class ConnectionLimits:
    """The bounds, shared by every connection of one server, and the connections themselves (oldest first)."""

    max_connections: int = 1024
    read_timeout_s: float = 10.0
    max_head_bytes: int = 32 * 1024
    on_close: Callable[[str], None] = lambda reason: None
    open: dict[GuardedH11Protocol, None] = field(default_factory=dict)

    def protocol_class(self) -> type[GuardedH11Protocol]:
        """uvicorn's ``http=`` takes a class; this one carries these limits."""
        return type("BoundGuardedH11Protocol", (GuardedH11Protocol,), {"limits": self})

    def admit(self, connection: GuardedH11Protocol) -> bool:
        if len(self.open) >= self.max_connections:
            idle = next((other for other in self.open if other.idle), None)
            if idle is None:
                return False
            idle.close_idle()
        self.open[connection] = None
        return True


class GuardedH11Protocol(H11Protocol):
    limits: ConnectionLimits  # set by ConnectionLimits.protocol_class

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None  # armed while a request head is awaited
        self._head_bytes = 0
        self._cycle_before_head: object = None  # the request cycle before the awaited head arrives
        self._discarding = False  # refused: what still arrives is read and dropped until the close

    @property
    def idle(self) -> bool:
        """No request in flight: waiting for a (first or next) request head."""
        return self._head_timer is not None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.limits.admit(self):
            log.warning(
                "HTTP connection refused: %d connections open, every one with a request in flight "
                "(--http-max-connections)",
                len(self.limits.open),
            )
            self._refuse(
                REFUSED,
                503,
                "UNAVAILABLE",
                f"the server holds {self.limits.max_connections} connections, each with a request in flight "
                "(--http-max-connections); retry shortly",
            )
            return
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self.limits.open.pop(self, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if not self.idle:
            super().data_received(data)  # a request's body: the front end bounds it
            return
        # h11 is fed at most the bound's worth of head, so a head one byte over it is seen as such
        # however the bytes were split into reads.
        room = max(0, self.limits.max_head_bytes - self._head_bytes)
        first, rest = data[:room], data[room:]
        self._head_bytes += len(first)
        if first:
            super().data_received(first)
        if self._discarding or self.transport.is_closing():
            return
        if self.cycle is not self._cycle_before_head:
            self._stop_head_timer()  # the head arrived: from here the request is the front end's
            if rest:
                super().data_received(rest)
        elif rest:
            self._head_bytes += len(rest)
            self._refuse_large_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A pipelined request may already have started in super(); otherwise the next head is awaited.
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._await_head()

    def send_400_response(self, msg: str) -> None:
        # h11 refuses what it cannot parse, its own head-size bound among it; ours is the same size.
        if self._head_bytes > self.limits.max_head_bytes:
            self._refuse_large_head()
            return
        self._refuse(MALFORMED, 400, "INVALID_ARGUMENT", "the request is not valid HTTP/1.1")

    def close_idle(self) -> None:
        """Closes this connection, which has no request in flight, to make room for a new one."""
        self.limits.on_close(EVICTED)
        self._close()

    # ---- internals ---------------------------------------------------------------------------

    def _await_head(self) -> None:
        self._stop_head_timer()
        self._head_bytes = 0
        self._cycle_before_head = self.cycle
        self._head_timer = self.loop.call_later(self.limits.read_timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes == 0:
            self._close()  # nothing asked: an ordinary idle close, as a keep-alive timeout is
            return
        self._refuse(
            HEAD_TIMEOUT,
            408,
            "DEADLINE_EXCEEDED",
            f"the request line and headers did not arrive within {self.limits.read_timeout_s:g} s "
            "(--http-read-timeout)",
        )

    def _refuse_large_head(self) -> None:
        self._refuse(
            HEAD_TOO_LARGE,
            431,
            "INVALID_ARGUMENT",
            f"the request line and headers are over {self.limits.max_head_bytes // 1024} KiB (--http-max-header-kb)",
        )

    def _refuse(self, reason: str, status: int, code: str, message: str) -> None:
        self._stop_head_timer()
        self.limits.on_close(reason)
        body = json.dumps(
            {"error": {"message": message, "type": _ERROR_TYPE[status], "param": None, "code": code}}
        ).encode()
        head = (
            f"HTTP/1.1 {status} {_PHRASE[status]}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        # A lingering close: a socket closed with unread bytes in it is reset, and the reset can
        # overtake the answer. So our side is shut, and what the client still sends is dropped
        # for a moment, giving it time to read why.
        self._stop_head_timer()
        self.limits.open.pop(self, None)
        self._discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self._close)

    def _close(self) -> None:
        self._stop_head_timer()
        self.limits.open.pop(self, None)
        with contextlib.suppress(h11.LocalProtocolError):  # a half-sent exchange: closed all the same
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


_PHRASE = {
    400: "Bad Request",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
_ERROR_TYPE = {
    400: "invalid_request_error",
    408: "timeout_error",
    431: "invalid_request_error",
    503: "service_unavailable_error",
}
