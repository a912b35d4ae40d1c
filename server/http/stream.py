"""Noticing that an HTTP client hung up, and streaming server-sent events to one that has not.

uvicorn says a client has gone only through ``receive()`` (an ``http.disconnect`` message);
a send to a gone client is silently dropped.  So while a request generates, a second task
listens, and a hang-up cancels the work: the engine's generator is closed and the request
counts as CANCELLED, as a gRPC cancel does.  (Starlette's own StreamingResponse does the
same listening but leaves the body generator to the garbage collector; sse-starlette also
ends streams on its own shutdown watcher, where ours must drain.)

A client that stays connected but stops reading is given ``--stream-stall-timeout``, as on
gRPC: the held-back send is given up, ``StreamStalled`` is thrown into the generator where it
waits (inside the shared call, which counts it), and the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from server.calls import CallFailed, StreamStalled

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client hung up before its answer was ready."""


async def _until_disconnected(receive: Receive) -> None:
    # Only after the request body has been read: until then receive() hands out the body.
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(work: Awaitable[Any], receive: Receive, tasks: set[asyncio.Task]) -> Any:
    """The result of ``work``; raises ClientGone (after ``work`` has been cancelled) if the client hangs up first.

    ``work`` runs as a task held in ``tasks`` while it runs, so the server can end it (a cancel
    that also reads here as ClientGone).
    """
    task = asyncio.ensure_future(work)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    listener = asyncio.ensure_future(_until_disconnected(receive))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        # Let the cancelled work finish its own clean-up (the engine's generator closes, the count is made).
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientGone()
    error = task.exception()
    if error is None:
        return task.result()
    # Raised without this frame holding the task: a task -> exception -> traceback -> this frame ->
    # task cycle would keep the request alive until a full collection.
    del task
    raise error


class EventStream(Response):
    """``text/event-stream`` from ``first`` (already made) and then ``rest``, with the stall timeout."""

    media_type = "text/event-stream"

    def __init__(
        self,
        first: bytes,
        rest: AsyncGenerator[bytes, None],
        headers: Mapping[str, str],
        stall_timeout_s: float,
        tasks: set[asyncio.Task],
        cut: Callable[[], bytes | None],
    ) -> None:
        """``tasks``: where the pump is held while it runs, so the server can end it; ``cut``: the
        closing events of a stream whose pump was ended that way (None: the client left)."""
        self.status_code = 200
        self.background = None
        self._first, self._rest = first, rest
        self._stall_timeout_s = stall_timeout_s
        self._tasks, self._cut = tasks, cut
        self._ended = False  # the last body message went out
        self.init_headers({**headers, "cache-control": "no-store", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        self._tasks.add(pump)
        pump.add_done_callback(self._tasks.discard)
        listener = asyncio.ensure_future(_until_disconnected(receive))
        try:
            await asyncio.wait({pump, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            listener.cancel()
            if not pump.done():
                pump.cancel()  # the client hung up: the generator is closed
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        closing = self._cut() if pump.cancelled() and not listener.done() and not self._ended else None
        if closing is not None:
            # The server ended the stream under a client still there: it is told why, then [DONE].
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(self._stall_timeout_s):
                    await send({"type": "http.response.body", "body": closing, "more_body": False})

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async with contextlib.aclosing(self._rest) as rest:
            chunk = self._first
            while True:
                try:
                    # asyncio.timeout, not wait_for: no task per event on a path taken for every token.
                    async with asyncio.timeout(self._stall_timeout_s):
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except TimeoutError:
                    stalled = StreamStalled(
                        f"the stream was cancelled: the client read nothing for {self._stall_timeout_s:g} s "
                        "(--stream-stall-timeout)"
                    )
                    # Thrown where the generator waits, inside the shared call that counts it (which
                    # answers with CallFailed); returning without ending the response makes uvicorn
                    # close the connection.
                    with contextlib.suppress(StopAsyncIteration, StreamStalled, CallFailed):
                        await rest.athrow(stalled)
                    return
                try:
                    chunk = await anext(rest)
                except StopAsyncIteration:
                    break
        self._ended = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
