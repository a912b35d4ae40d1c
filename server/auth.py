"""Bearer-token auth through call metadata: ``authorization: Bearer <token>``.

One shared token, set with ``--auth-token-file`` or ``YAYI_AUTH_TOKEN``: enough to keep
strangers off expensive hardware without an identity provider, and the header is the one
gRPC's own ``access_token_call_credentials`` sends.  The token is compared in constant
time and never logged; a refused call is counted as UNAUTHENTICATED like any other status.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable

import grpc

log = logging.getLogger(__name__)

# Health stays open: kubelet and load-balancer probes carry no token, and it says nothing
# beyond SERVING or NOT_SERVING.  Reflection is NOT exempt: it describes the whole API to
# whoever asks, and the tools that use it (grpcurl -H 'authorization: Bearer ...') can
# send the token as easily as any client.
EXEMPT_SERVICES = frozenset({"grpc.health.v1.Health"})
_HEADER = "authorization"


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, on_refused: Callable[[str], None] | None = None) -> None:
        if not token:
            raise ValueError("the auth token must not be empty")
        self._expected = f"Bearer {token}".encode()
        self._on_refused = on_refused

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.strip("/").partition("/")[0]
        if handler is None or service in EXEMPT_SERVICES:
            return handler
        reason = self._refusal(handler_call_details.invocation_metadata)
        if reason is None:
            return handler
        log.debug("refused %s: %s", handler_call_details.method, reason)  # the reason never holds the token
        if self._on_refused is not None:
            self._on_refused(grpc.StatusCode.UNAUTHENTICATED.name)
        return _refusing_handler(handler, reason)

    def _refusal(self, metadata) -> str | None:
        given = next((value for key, value in metadata or () if key == _HEADER), None)
        if given is None:
            return "missing credentials: send the metadata 'authorization: Bearer <token>'"
        given = given.encode() if isinstance(given, str) else given
        # Constant time, so the time of a refusal does not tell how much of a guess was right.
        if not hmac.compare_digest(given, self._expected):
            return "invalid bearer token"
        return None


def _refusing_handler(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    async def refuse(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    # Same call shape as the real method; no deserializer, so a stranger's bytes are never parsed.
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
