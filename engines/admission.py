"""A bounded waiting room in front of a fixed number of running slots.

Past the bound a request is refused at once (QueueFull) instead of piling up: a
client under overload learns it in microseconds and can back off or go elsewhere.

The bound is a count (``max_waiting``) and, optionally, a time (``max_wait_s``): a request
whose estimated wait for a slot is longer than that is refused too, so the requests that are
accepted can still meet a latency target when the load is past capacity.  The wait is
estimated from the queue ahead of it and the service time of the slots, measured as they are
released: slots free up at ``max_running / service_s`` per second, so the newcomer behind
``waiting`` others waits about ``(waiting + 1) * service_s / max_running``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from engines.errors import QueueFull

# Weight of the newest service time in the running mean: recent enough to follow a change of
# workload within a few dozen requests, smooth enough that one long request does not swing it.
SERVICE_WEIGHT = 0.1


class Admission:
    def __init__(self, max_running: int, max_waiting: int, max_wait_s: float | None = None) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be at least 1, got {max_running}")
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be 0 or more, got {max_waiting}")
        if max_wait_s is not None and max_wait_s <= 0:
            raise ValueError(f"max_wait_s must be positive, got {max_wait_s}")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        self.running = 0
        self.waiting = 0
        self.service_s: float | None = None  # mean seconds a slot is held; None until one is released
        self._free = asyncio.Semaphore(max_running)

    def estimated_wait_s(self) -> float:
        """Seconds a request arriving now would wait for a slot: 0 while one is free or nothing is measured."""
        if not self._free.locked() or self.service_s is None:
            return 0.0
        return (self.waiting + 1) * self.service_s / self.max_running

    def record_service(self, seconds: float) -> None:
        if self.service_s is None:
            self.service_s = seconds
        else:
            self.service_s += SERVICE_WEIGHT * (seconds - self.service_s)

    @contextlib.asynccontextmanager
    async def slot(self):
        if self._free.locked() and self.waiting >= self.max_waiting:
            wait = self.estimated_wait_s()
            raise QueueFull(
                f"server is at capacity: {self.running} running, {self.waiting} waiting "
                f"(queue bound {self.max_waiting}); retry later",
                # The queue moves up one place per freed slot: a retry after one service time may find room.
                retry_after_s=self.service_s / self.max_running if wait and self.service_s else None,
            )
        if self.max_wait_s is not None:
            wait = self.estimated_wait_s()
            if wait > self.max_wait_s:
                retry = max(1.0, wait - self.max_wait_s)
                raise QueueFull(
                    f"server is at capacity: the wait for a slot would be about {wait:.1f} s "
                    f"({self.waiting} waiting), over the bound of {self.max_wait_s:g} s; retry in about "
                    f"{round(retry)} s",
                    retry_after_s=retry,
                )
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        started = time.monotonic()
        try:
            yield
        finally:
            self.running -= 1
            self.record_service(time.monotonic() - started)
            self._free.release()
