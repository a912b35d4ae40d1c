"""grpc.health.v1 with a bound on Health.Watch streams.

Health is open to callers without a token (probes carry none), and each Watch stream is
held open for as long as the caller likes: 10,240 of them cost 219 MB.  Probes (kubelet,
grpc-health-probe, load balancers) use Check; past ``max_watchers`` open Watch streams a
new one is refused with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import grpc
from grpc_health.v1._async import HealthServicer


class BoundedHealth(HealthServicer):
    def __init__(self, max_watchers: int) -> None:
        super().__init__()
        self.max_watchers = max_watchers
        self.watchers = 0

    async def Watch(self, request, context) -> None:
        if self.watchers >= self.max_watchers:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_watchers} Health.Watch streams are open already; use Check, or close a Watch first",
            )
        self.watchers += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watchers -= 1
