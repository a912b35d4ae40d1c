"""The gate every call passes before a servicer sees it: token check, then the request bytes.

grpc reads a unary call's message before any handler runs, and refuses a malformed one
with UNKNOWN and protobuf's exception class in the message.  The gate takes the reading
over: each unary-request method is served as a request-streaming one, so

- a caller without the token is refused before a byte of its message is read (it can make
  the server hold no more than HTTP/2's flow-control window per stream);
- bytes that are not the method's message get INVALID_ARGUMENT with a plain sentence;
- a message over ``--max-receive-mb`` (which grpc itself refuses with RESOURCE_EXHAUSTED)
  is still counted;

and every refusal is counted in ``yayi_requests_total`` like any other outcome.  The
servicer then receives the parsed message exactly as before.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError

from server.auth import TokenAuth

log = logging.getLogger(__name__)

# Health stays open: kubelet and load-balancer probes carry no token, and it says nothing
# beyond SERVING or NOT_SERVING.  Reflection is NOT exempt: it describes the whole API to
# whoever asks, and the tools that use it (grpcurl -H 'authorization: Bearer ...') can
# send the token as easily as any client.
AUTH_EXEMPT_SERVICES = frozenset({"grpc.health.v1.Health"})

Count = Callable[[str, str], None]  # (status name, method name)


class _Malformed:
    """What the safe deserializer returns for bytes that are not the expected message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def method_name(full_method: str) -> str:
    """'/yayi.serving.v1.Inference/Generate' -> 'Generate'."""
    return full_method.rpartition("/")[2]


class RequestGate(grpc.aio.ServerInterceptor):
    def __init__(self, count: Count, auth: TokenAuth | None = None) -> None:
        self._count = count
        self._auth = auth

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = method_name(handler_call_details.method)
        service = handler_call_details.method.strip("/").partition("/")[0]
        refusal = None
        if self._auth is not None and service not in AUTH_EXEMPT_SERVICES:
            refusal = self._auth.refusal(handler_call_details.invocation_metadata)
            if refusal is not None:
                log.debug("refused %s: %s", handler_call_details.method, refusal)  # never holds the token
        if refusal is not None:
            return _refusing(handler, method, refusal, self._count)
        if handler.request_streaming:
            return handler  # reflection's stream: protobuf errors there are the library's to report
        return _reading(handler, method, self._count)


def _refusing(handler, method: str, reason: str, count: Count):
    async def refuse(request_iterator, context):
        count(grpc.StatusCode.UNAUTHENTICATED.name, method)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    # Request-streaming shape with no deserializer: a stranger's bytes are never read or parsed.
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    return grpc.stream_unary_rpc_method_handler(refuse)


def _reading(handler, method: str, count: Count):
    parse = handler.request_deserializer
    owner = getattr(parse, "__self__", None)  # the message class whose FromString this is
    descriptor = getattr(owner, "DESCRIPTOR", None)
    expected = descriptor.full_name if descriptor is not None else "request"

    def safe_parse(raw: bytes):
        try:
            return parse(raw)
        except (DecodeError, ValueError, TypeError) as exc:
            return _Malformed(exc)

    async def one_message(requests, context):
        message = None
        async for received in requests:  # a unary call: one message at most
            message = received
            break
        if message is None:
            # grpc ended the call itself: the message was over --max-receive-mb (RESOURCE_EXHAUSTED
            # has been sent). Counted here; ending quietly keeps grpc from sending a second status.
            count(grpc.StatusCode.RESOURCE_EXHAUSTED.name, method)
            raise asyncio.CancelledError()
        if isinstance(message, _Malformed):
            count(grpc.StatusCode.INVALID_ARGUMENT.name, method)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request body is not a valid {expected} message; send the message of the "
                f"method {method} as protos/yayi/serving/v1/inference.proto defines it",
            )
        return message

    if handler.response_streaming:
        behavior = handler.unary_stream
        if inspect.isasyncgenfunction(behavior):

            async def unary_stream(requests, context):
                async for response in behavior(await one_message(requests, context), context):
                    yield response
        else:  # writes with context.write itself

            async def unary_stream(requests, context):
                return await behavior(await one_message(requests, context), context)

        return grpc.stream_stream_rpc_method_handler(
            unary_stream, request_deserializer=safe_parse, response_serializer=handler.response_serializer
        )
    behavior = handler.unary_unary

    async def unary_unary(requests, context):
        return await behavior(await one_message(requests, context), context)

    return grpc.stream_unary_rpc_method_handler(
        unary_unary, request_deserializer=safe_parse, response_serializer=handler.response_serializer
    )
