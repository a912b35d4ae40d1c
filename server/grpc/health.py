"""grpc.health.v1 with a bound on Health.Watch streams, showing the server's ServingState.

Health is open to callers without a token (probes carry none), and each Watch stream is
held open for as long as the caller likes: 10,240 of them cost 219 MB.  Probes (kubelet,
grpc-health-probe, load balancers) use Check; past ``max_watchers`` open Watch streams a
new one is refused with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from server.grpc.wire import SERVICE_NAME
from server.serving_state import ServingState

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class BoundedHealth(HealthServicer):
    def __init__(self, max_watchers: int) -> None:
        super().__init__()
        self.max_watchers = max_watchers
        self.watchers = 0

    async def show(self, state: ServingState) -> None:
        """The server's state as both the whole server ("") and the Inference service report it.

        Draining is grpc's graceful shutdown: every service NOT_SERVING, and no later change."""
        if state.draining:
            await self.enter_graceful_shutdown()
            return
        status = SERVING if state.serving else NOT_SERVING
        await self.set("", status)
        await self.set(SERVICE_NAME, status)

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
