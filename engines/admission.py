"""A bounded waiting room in front of a fixed number of running slots.

Past the bound a request is refused at once (QueueFull) instead of piling up: a
client under overload learns it in microseconds and can back off or go elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib

from engines.errors import QueueFull


class Admission:
    def __init__(self, max_running: int, max_waiting: int) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be at least 1, got {max_running}")
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be 0 or more, got {max_waiting}")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.running = 0
        self.waiting = 0
        self._free = asyncio.Semaphore(max_running)

    @contextlib.asynccontextmanager
    async def slot(self):
        if self._free.locked() and self.waiting >= self.max_waiting:
            raise QueueFull(
                f"server is at capacity: {self.running} running, {self.waiting} waiting "
                f"(queue bound {self.max_waiting}); retry later"
            )
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._free.release()
