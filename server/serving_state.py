"""Whether the server takes work and what health reports: one object, read by both front ends.

app.py owns it and moves it through the server's life, in this order:

- loading: health NOT_SERVING, no work accepted (the ports are already bound);
- ready: the model is loaded, health SERVING, work accepted;
- draining (on SIGTERM or SIGINT): health NOT_SERVING, no new work on either front end;
- engine lost, at any time once ready: health NOT_SERVING for good; calls are still let through
  so each gets the engine's own error, which says why.

gRPC health is told of each change (``on_change``, server/grpc/health.py), HTTP /health reads
``serving``, and Calls reads ``accepting`` and reports an engine a request left unable to serve.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("yayi-serve")


class ServingState:
    def __init__(self) -> None:
        self.accepting = False  # calls are let in: false while loading and once draining
        self.serving = False  # what health reports
        self.draining = False
        self.engine_lost = False
        self._ready = False  # an engine can be lost only once it was up
        self._listeners: list[Callable[[ServingState], Awaitable[None]]] = []

    def on_change(self, listener: Callable[[ServingState], Awaitable[None]]) -> None:
        """``listener(state)`` is awaited after every change of ``serving`` or ``draining``."""
        self._listeners.append(listener)

    async def loading(self) -> None:
        self.accepting = False
        await self._publish(serving=False)

    async def ready(self) -> None:
        self._ready = True
        self.accepting = True
        await self._publish(serving=True)

    async def drain(self) -> None:
        """Health first, so probes move traffic away, then no new work on either front end."""
        self.draining = True
        await self._publish(serving=False)
        self.accepting = False

    async def lose_engine(self) -> None:
        """The engine said it cannot recover: NOT_SERVING for good, reported once."""
        if self.engine_lost or not self._ready:
            return
        self.engine_lost = True
        log.error("engine cannot recover: health is NOT_SERVING; restart the server")
        await self._publish(serving=False)

    async def _publish(self, serving: bool) -> None:
        self.serving = serving
        for listener in self._listeners:
            await listener(self)
