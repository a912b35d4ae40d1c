"""The OpenAI-compatible HTTP front end: a Starlette app over the same request path as gRPC.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions``.  Everything a request goes through after its bytes are read
(checks, request ids, generation, metrics, the outcome and its count) is server/calls.py,
shared with the gRPC servicer; this module turns OpenAI's JSON into that path's plain types
(through server/http_api.py) and its outcome into an HTTP answer.  The answer's status comes
from the gRPC status name through the one table in server/errors.py.

What happens before the shared path mirrors server/gate.py: the token is checked before a
byte of the body is read, and a body over ``--max-receive-mb`` is refused; both counted.
"""

from __future__ import annotations

import contextlib
import logging
import time

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .auth import TokenAuth
from .calls import MAX_REQUEST_ID_CHARS, CallFailed, Calls
from .http_api import (
    DONE,
    ChunkWriter,
    GenerateCall,
    completion,
    error_body,
    event,
    parse_generate,
    parse_json,
    usage,
)
from .http_stream import ClientGone, EventStream, unless_disconnected
from .metrics import RequestRecorder

log = logging.getLogger(__name__)

API = "http"
REQUEST_ID_HEADER = "x-request-id"
# The ``method`` label of each route in yayi_requests_total: a fixed set, never the raw path.
COMPLETIONS, CHAT, MODELS = "/v1/completions", "/v1/chat/completions", "/v1/models"


class HttpFrontEnd:
    def __init__(
        self,
        calls: Calls,
        served_model: str,
        auth: TokenAuth | None = None,
        stall_timeout_s: float = 20.0,
        max_body_bytes: int = 1024 * 1024,
    ) -> None:
        self._calls = calls
        self._metrics = calls.metrics
        self.served_model = served_model
        self._auth = auth
        self._stall_timeout_s = stall_timeout_s
        self._max_body_bytes = max_body_bytes
        self._created = int(time.time())
        self.app = Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route(MODELS, self.models, methods=["GET"]),
                Route(COMPLETIONS, self.completions, methods=["POST"]),
                Route(CHAT, self.chat_completions, methods=["POST"]),
            ]
        )

    # ---- routes -------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        # Open to probes without a token, like gRPC health; the same state (app.py sets both).
        if self._calls.serving:
            return JSONResponse({"status": "SERVING"})
        return JSONResponse({"status": "NOT_SERVING"}, status_code=503)

    async def models(self, request: Request) -> Response:
        refusal = self._refusal(request, MODELS)
        if refusal is not None:
            return refusal
        try:
            async with self._calls.call(self._metrics.recorder(MODELS, api=API, generates=False)):
                self._calls.require_accepting()
                info = self._calls.engine.info()
        except CallFailed as failure:
            return _error(failure)
        card = {
            "id": self.served_model,
            "object": "model",
            "created": self._created,
            "owned_by": "yayi-serve",
            "root": self.served_model,
            "max_model_len": info.max_context,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, COMPLETIONS, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, CHAT, chat=True)

    # ---- the generate routes ------------------------------------------------------------------

    async def _generate(self, request: Request, method: str, chat: bool) -> Response:
        given_id = request.headers.get(REQUEST_ID_HEADER, "")
        # The id comes back on every answer, errors included (an over-long one is refused, not echoed).
        headers = {REQUEST_ID_HEADER: given_id} if given_id and len(given_id) <= MAX_REQUEST_ID_CHARS else {}
        refusal = self._refusal(request, method, headers)
        if refusal is not None:
            return refusal
        raw = await self._read_body(request, method, headers)
        if isinstance(raw, Response):
            return raw
        recorder = self._metrics.recorder(method, api=API)
        events = self._events(raw, given_id, chat, recorder, headers)
        try:
            # The first event is made before any header is sent, so a refusal (bad input, a full
            # queue) is a real HTTP status and not an error inside a 200 stream.
            first = await unless_disconnected(anext(events), request.receive)
        except CallFailed as failure:
            return _error(failure, headers)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the work is stopped and counted
        if isinstance(first, dict):  # not streamed: the whole completion
            with contextlib.suppress(StopAsyncIteration):
                await anext(events)  # lets the call end, counted, before the answer leaves
            return JSONResponse(first, headers=headers)
        return EventStream(first, events, headers, self._stall_timeout_s)

    async def _events(self, raw: bytes, given_id: str, chat: bool, recorder: RequestRecorder, headers: dict):
        """The whole call: a completion dict (not streamed) or the stream's events, as bytes."""
        started = False
        writer: ChunkWriter | None = None
        last = None
        try:
            async with (
                self._calls.call(recorder),
                self._calls.claim_request_id(given_id) as request_id,
            ):
                headers[REQUEST_ID_HEADER] = request_id
                call = parse_generate(parse_json(raw), self.served_model, chat)
                outputs = self._calls.outputs(call.prompt, call.params, request_id, recorder, use_chat_template=chat)
                async with contextlib.aclosing(outputs):
                    if not call.stream:
                        yield await self._whole(outputs, request_id, call)
                        return
                    writer = ChunkWriter(request_id, self.served_model, call)
                    async for output in outputs:
                        last = output
                        # One event per new piece of text; tokens whose text is held back ride along later.
                        if not output.text and output.finish_reason is None:
                            continue
                        yield writer.chunk(
                            output.text, output.finish_reason, usage(output.prompt_tokens, output.completion_tokens)
                        )
                        started = True
        except CallFailed as failure:
            if not started or failure.stalled:
                raise  # before the first event: a real HTTP status; stalled: nobody reads anything more
            # Mid-stream, the status line has gone: the error travels as an event, as vLLM sends it.
            _, body = error_body(failure.status, failure.message, _param(failure))
            yield event(body) + DONE
            return
        # Counted OK by now: the usage and [DONE] are sent after the count, as gRPC's status is.
        yield writer.end(usage(last.prompt_tokens, last.completion_tokens) if last else None)

    async def _whole(self, outputs, request_id: str, call: GenerateCall) -> dict:
        parts: list[str] = []
        last = None
        async for output in outputs:
            parts.append(output.text)
            last = output
        return completion(
            request_id,
            self.served_model,
            call.chat,
            "".join(parts),
            last.finish_reason,
            usage(last.prompt_tokens, last.completion_tokens),
        )

    # ---- before the shared path ---------------------------------------------------------------

    def _refusal(self, request: Request, method: str, headers: dict | None = None) -> Response | None:
        if self._auth is None:
            return None
        given = request.headers.get("authorization")
        reason = self._auth.refusal([("authorization", given)] if given is not None else [])
        if reason is None:
            return None
        log.debug("refused %s: %s", method, reason)  # never holds the token
        self._metrics.count_request("UNAUTHENTICATED", method, API)
        status, body = error_body("UNAUTHENTICATED", reason)
        return JSONResponse(body, status_code=status, headers={**(headers or {}), "www-authenticate": "Bearer"})

    async def _read_body(self, request: Request, method: str, headers: dict) -> bytes | Response:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_body_bytes:
            return self._too_large(method, headers)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self._max_body_bytes:
                    return self._too_large(method, headers)
                chunks.append(chunk)
        except ClientDisconnect:
            self._metrics.count_request("CANCELLED", method, API)
            return Response(status_code=499)
        return b"".join(chunks)

    def _too_large(self, method: str, headers: dict) -> Response:
        # gRPC refuses an oversize message with RESOURCE_EXHAUSTED and it is counted so; over HTTP the
        # answer is 413, which a client does not retry as it would a 429.
        self._metrics.count_request("RESOURCE_EXHAUSTED", method, API)
        _, body = error_body(
            "RESOURCE_EXHAUSTED", f"the request body is over {self._max_body_bytes} bytes (--max-receive-mb)"
        )
        return JSONResponse(body, status_code=413, headers={**headers, "connection": "close"})


def _param(failure: CallFailed) -> str | None:
    return getattr(failure.__cause__, "param", None)


def _error(failure: CallFailed, headers: dict | None = None) -> JSONResponse:
    status, body = error_body(failure.status, failure.message, _param(failure))
    return JSONResponse(body, status_code=status, headers=headers)
