"""The OpenAI-compatible HTTP front end: a Starlette app over the same request path as gRPC.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions``.  Everything a request goes through after its bytes are read
(checks, request ids, generation, metrics, the outcome and its count) is server/calls.py,
shared with the gRPC servicer; this module turns OpenAI's JSON into that path's plain types
(through the typed requests of server/http/protocol.py) and its outcome into an HTTP answer
(in the shapes of server/http/api.py).  The answer's status comes from the gRPC status name
through the one table in server/errors.py.

What happens before the shared path mirrors server/grpc/gate.py: the token is checked before a
byte of the body is read, and a body over ``--max-receive-mb`` is refused; both counted.
Before that, ``_guard`` bounds the requests in flight (``--max-concurrent-rpcs``, health
exempt, as on gRPC) apart from the connections (server/http/limits.py), and turns whatever
no route answered (an unknown path, a wrong method, a bug) into OpenAI's error shape.

Past the drain's grace period, ``end_calls`` ends what is still open with an answer: a
request still waiting gets 503, a running stream an error event and ``[DONE]``, each counted
UNAVAILABLE, rather than being torn down by uvicorn's own shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any, cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.auth import TokenAuth
from server.calls import CANCELLED, MAX_REQUEST_ID_CHARS, CallFailed, Calls, forget_traceback
from server.http import tokens as http_tokens
from server.http.answer import Answer
from server.http.api import DONE, ChunkWriter, completion, error_body, event, usage
from server.http.protocol import GenerateCall, generate_call, http_param, parse_json
from server.http.stream import ClientGone, EventStream, unless_disconnected
from server.metrics import RequestRecorder

log = logging.getLogger(__name__)

API = "http"
REQUEST_ID_HEADER = "x-request-id"
# The ``method`` label of each route in yayi_requests_total: a fixed set, never the raw path.
COMPLETIONS, CHAT, MODELS = "/v1/completions", "/v1/chat/completions", "/v1/models"
TOKENIZE, DETOKENIZE, TOKENIZER_INFO = "/tokenize", "/detokenize", "/tokenizer_info"
HEALTH = "/health"
ROUTES = (COMPLETIONS, CHAT, MODELS, TOKENIZE, DETOKENIZE, TOKENIZER_INFO)
UNAVAILABLE = "UNAVAILABLE"
ENDED = "the server is shutting down and its grace period (--grace-period) is over; retry on another replica"


class HttpFrontEnd:
    def __init__(
        self,
        calls: Calls,
        served_model: str,
        auth: TokenAuth | None = None,
        stall_timeout_s: float = 20.0,
        max_body_bytes: int = 1024 * 1024,
        read_timeout_s: float = 10.0,
        max_requests: int = 256,
    ) -> None:
        self._calls = calls
        self._metrics = calls.metrics
        self.served_model = served_model
        self._auth = auth
        self._stall_timeout_s = stall_timeout_s
        self._max_body_bytes = max_body_bytes
        self._read_timeout_s = read_timeout_s
        self._max_requests = max_requests
        self._in_flight = 0  # requests past _guard, health excepted
        self._work: set[asyncio.Task] = set()  # the tasks generating answers, ended by end_calls
        self._ending = False
        self._created = int(time.time())
        self._routes = Starlette(
            routes=[
                Route(HEALTH, self.health, methods=["GET"]),
                Route(MODELS, self.models, methods=["GET"]),
                Route(COMPLETIONS, self.completions, methods=["POST"]),
                Route(CHAT, self.chat_completions, methods=["POST"]),
                Route(TOKENIZE, self.tokenize, methods=["POST"]),
                Route(DETOKENIZE, self.detokenize, methods=["POST"]),
                Route(TOKENIZER_INFO, self.tokenizer_info, methods=["GET"]),
            ],
            # Starlette's type for this dict admits only handlers of Exception itself.
            exception_handlers=cast(dict[Any, Any], {HTTPException: _http_exception, Exception: _internal}),
        )

    # ---- the ASGI app: the in-flight bound around the routes ----------------------------------

    async def app(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == HEALTH:
            await self._routes(scope, receive, send)
            return
        if self._in_flight >= self._max_requests:
            if scope["path"] in ROUTES:
                self._metrics.count_request("RESOURCE_EXHAUSTED", scope["path"], API)
            status, body = error_body(
                "RESOURCE_EXHAUSTED",
                f"{self._max_requests} HTTP requests are in flight (--max-concurrent-rpcs); retry shortly",
            )
            await JSONResponse(body, status_code=status)(scope, receive, send)
            return
        started = False

        async def tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self._in_flight += 1
        try:
            await self._routes(scope, receive, tracked)
        except asyncio.CancelledError:
            # uvicorn gives up on a call only when it stops; one not yet answered gets a refusal.
            if started or not self._ending:
                raise
            _, body = error_body(UNAVAILABLE, ENDED)
            await JSONResponse(body, status_code=503, headers={"connection": "close"})(scope, receive, send)
        finally:
            self._in_flight -= 1

    async def end_calls(self, timeout_s: float) -> None:
        """Ends every call still open, each with its answer (see the module's docstring)."""
        self._ending = True
        for task in list(self._work):
            task.cancel()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)

    def _cancelled_status(self) -> str:
        return UNAVAILABLE if self._ending else CANCELLED

    # ---- routes -------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        # Open to probes without a token, like gRPC health; the same ServingState (server/serving_state.py).
        if self._calls.state.serving:
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

    async def tokenize(self, request: Request) -> Response:
        def answer(body: dict) -> dict:
            info = self._calls.engine.info()
            return http_tokens.tokenize(body, self.served_model, self._calls.engine.tokenizer, info.max_context)

        return await self._tokenizer_call(request, TOKENIZE, answer)

    async def detokenize(self, request: Request) -> Response:
        def answer(body: dict) -> dict:
            info = self._calls.engine.info()
            return http_tokens.detokenize(body, self.served_model, self._calls.engine.tokenizer, info.vocab_size)

        return await self._tokenizer_call(request, DETOKENIZE, answer)

    async def tokenizer_info(self, request: Request) -> Response:
        return await self._tokenizer_call(
            request, TOKENIZER_INFO, lambda body: http_tokens.tokenizer_info(self._calls.engine.tokenizer)
        )

    async def _tokenizer_call(self, request: Request, method: str, answer) -> Response:
        """A tokenizer route: the same gate, body bound, count and error shape as the others."""
        refusal = self._refusal(request, method)
        if refusal is not None:
            return refusal
        raw = b"{}" if request.method == "GET" else await self._read_body(request, method, {})
        if isinstance(raw, Response):
            return raw
        try:
            async with self._calls.call(self._metrics.recorder(method, api=API, generates=False)):
                self._calls.require_accepting()
                body = parse_json(raw)
                result = await asyncio.to_thread(answer, body)
        except CallFailed as failure:
            return _error(failure)
        return JSONResponse(result)

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
        events = self._events(raw, given_id, method, recorder, headers)
        try:
            # The first event is made before any header is sent, so a refusal (bad input, a full
            # queue) is a real HTTP status and not an error inside a 200 stream.
            first = await unless_disconnected(anext(events), request.receive, self._work)
        except CallFailed as failure:
            return _error(failure, headers)
        except ClientGone:
            if self._ending:
                return _error(CallFailed(UNAVAILABLE, ENDED), {**headers, "connection": "close"})
            return Response(status_code=499)  # nobody reads it; the work is stopped and counted
        if isinstance(first, dict):  # not streamed: the whole completion
            with contextlib.suppress(StopAsyncIteration):
                await anext(events)  # lets the call end, counted, before the answer leaves
            return JSONResponse(first, headers=headers)
        return EventStream(first, events, headers, self._stall_timeout_s, self._work, self._cut_event)

    async def _events(self, raw: bytes, given_id: str, method: str, recorder: RequestRecorder, headers: dict):
        """The whole call: a completion dict (not streamed) or the stream's events, as bytes."""
        started = False
        writer: ChunkWriter | None = None
        answer: Answer | None = None
        try:
            async with (
                self._calls.call(recorder, cancelled_status=self._cancelled_status),
                self._calls.claim_request_id(given_id) as request_id,
            ):
                headers[REQUEST_ID_HEADER] = request_id
                call = generate_call(parse_json(raw), self.served_model, chat=method == CHAT)
                if not call.stream:
                    yield await self._whole(call, request_id, method, recorder)
                    return
                writer = ChunkWriter(request_id, self.served_model, call)
                answer = Answer(call, call.prompt, self._calls.engine.tokenizer)
                outputs = self._calls.outputs(
                    call.prompt, call.params, request_id, recorder, use_chat_template=call.chat
                )
                async with contextlib.aclosing(outputs):
                    async for output in outputs:
                        text, logprobs = await answer.add(output)
                        # One event per new piece of text; tokens whose text is held back ride along later.
                        if not text and output.finish_reason is None and not (logprobs and _has_tokens(logprobs)):
                            continue
                        yield writer.chunk(
                            text, output.finish_reason, usage(output.prompt_tokens, output.completion_tokens), logprobs
                        )
                        started = True
        except CallFailed as failure:
            if not started or failure.stalled:
                raise  # before the first event: a real HTTP status; stalled: nobody reads anything more
            # Mid-stream, the status line has gone: the error travels as an event, as vLLM sends it.
            yield _error_event(failure.status, _message(failure), _param(failure))
            return
        # Counted OK by now: the usage and [DONE] are sent after the count, as gRPC's status is.
        yield writer.end(usage(answer.prompt_tokens, answer.completion_tokens) if answer else None)

    async def _whole(self, call: GenerateCall, request_id: str, method: str, recorder: RequestRecorder) -> dict:
        """Every prompt's answer at once: each prompt is its own engine request, counted as one,
        and they run side by side, so a batching engine batches them."""
        tokenizer = self._calls.engine.tokenizer

        async def answer(prompt, engine_id: str, recorder: RequestRecorder) -> Answer:
            built = Answer(call, prompt, tokenizer)
            outputs = self._calls.outputs(prompt, call.params, engine_id, recorder, use_chat_template=call.chat)
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    await built.add(output)
            return built

        async def counted(index: int, prompt) -> Answer:
            own = self._metrics.recorder(method, api=API)
            async with self._calls.call(own, cancelled_status=self._cancelled_status):
                return await answer(prompt, f"{request_id}-{index}", own)

        tasks = [asyncio.ensure_future(answer(call.prompts[0], request_id, recorder))]
        tasks += [asyncio.ensure_future(counted(index, prompt)) for index, prompt in enumerate(call.prompts[1:], 1)]
        try:
            answers = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()  # one prompt failed (or the call was cancelled): the others stop too
        return completion(
            request_id,
            self.served_model,
            call.chat,
            [built.choice() for built in answers],
            usage(sum(built.prompt_tokens for built in answers), sum(built.completion_tokens for built in answers)),
        )

    def _cut_event(self) -> bytes | None:
        """What a stream ends with when its work was stopped under it: the error, if the server stopped it."""
        return _error_event(UNAVAILABLE, ENDED) if self._ending else None

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
            # The body's own deadline: a head that arrived in time must not trickle its body for ever.
            async with asyncio.timeout(self._read_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self._max_body_bytes:
                        return self._too_large(method, headers)
                    chunks.append(chunk)
        except ClientDisconnect:
            self._metrics.count_request("CANCELLED", method, API)
            return Response(status_code=499)
        except TimeoutError:
            self._metrics.count_request("DEADLINE_EXCEEDED", method, API)
            _, body = error_body(
                "DEADLINE_EXCEEDED",
                f"the request body did not arrive within {self._read_timeout_s:g} s (--http-read-timeout)",
            )
            return JSONResponse(body, status_code=408, headers={**headers, "connection": "close"})
        return b"".join(chunks)

    def _too_large(self, method: str, headers: dict) -> Response:
        # gRPC refuses an oversize message with RESOURCE_EXHAUSTED and it is counted so; over HTTP the
        # answer is 413, which a client does not retry as it would a 429.
        self._metrics.count_request("RESOURCE_EXHAUSTED", method, API)
        _, body = error_body(
            "RESOURCE_EXHAUSTED", f"the request body is over {self._max_body_bytes} bytes (--max-receive-mb)"
        )
        body["error"]["type"] = "invalid_request_error"  # too large is the request's fault, not a rate limit
        return JSONResponse(body, status_code=413, headers={**headers, "connection": "close"})


def _param(failure: CallFailed) -> str | None:
    return http_param(failure.field)


def _message(failure: CallFailed) -> str:
    """The message with the field named as an OpenAI body names it (max_new_tokens is max_tokens here)."""
    param = _param(failure)
    if failure.field and param and param != failure.field:
        return failure.message.replace(failure.field, param)
    return failure.message


def _error(failure: CallFailed, headers: dict | None = None) -> JSONResponse:
    status, body = error_body(failure.status, _message(failure), _param(failure))
    forget_traceback(failure)
    if failure.retry_after_s is not None:
        # RFC 9110 takes whole seconds; the OpenAI SDK waits this long before its own retry.
        headers = {**(headers or {}), "retry-after": str(max(1, math.ceil(failure.retry_after_s)))}
    return JSONResponse(body, status_code=status, headers=headers)


def _has_tokens(logprobs: dict) -> bool:
    return bool(logprobs.get("tokens") or logprobs.get("content"))


def _error_event(status: str, message: str, param: str | None = None) -> bytes:
    _, body = error_body(status, message, param)
    return event(body) + DONE


# Starlette's own answers for an unknown path or a wrong method, and for a bug, in OpenAI's shape.
_HTTP_EXCEPTION_CODE = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    code = _HTTP_EXCEPTION_CODE.get(exc.status_code, "INVALID_ARGUMENT")
    message = {
        404: f"no route {request.url.path!r}; this server serves {', '.join((HEALTH, *ROUTES))}",
        405: f"{request.method} is not allowed on {request.url.path!r}",
    }.get(exc.status_code, str(exc.detail))
    _, body = error_body(code, message)
    body["error"]["type"] = "invalid_request_error"
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _internal(request: Request, exc: Exception) -> Response:
    log.error("internal error in the HTTP front end: %r", exc, exc_info=exc)
    _, body = error_body("INTERNAL", f"internal error ({type(exc).__name__}); the server log has the details")
    return JSONResponse(body, status_code=500)
