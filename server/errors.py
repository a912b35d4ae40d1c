"""Exceptions become statuses here and nowhere else, and statuses become HTTP codes here too.

A status is a gRPC status code; the HTTP front end answers with the HTTP code for the code's
name from ``HTTP_STATUS``, so both front ends give the same outcome for the same failure
(docs/design.md, "Status codes" and "HTTP front end").
"""

from __future__ import annotations

import logging

import grpc

from engines.errors import EngineOutOfMemory, EngineUnavailable, InvalidRequest, QueueFull, Unsupported

log = logging.getLogger(__name__)

_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineOutOfMemory, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineUnavailable, grpc.StatusCode.UNAVAILABLE),
    (Unsupported, grpc.StatusCode.UNIMPLEMENTED),
]

# gRPC status name -> HTTP status. The first six are the design's table; anything else is 500.
HTTP_STATUS: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "UNIMPLEMENTED": 501,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    # Anything else is a bug in the server or an engine, never the client's fault.
    log.error("internal error: %r", exc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); the server log has the details"


def http_status(status: str) -> int:
    return HTTP_STATUS.get(status, 500)
