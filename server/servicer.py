"""The Inference service: wire messages in, engine calls, wire messages out.

It knows the Engine interface and nothing of any engine's insides.  Every call goes
through ``_guard``, which maps exceptions to status codes (via server/errors.py) and
counts the request's final status once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Awaitable, Callable

import grpc

from engines.base import Engine
from engines.errors import EngineUnavailable, InvalidRequest

from . import convert
from .errors import status_for
from .metrics import RequestRecorder, ServerMetrics
from .wire import pb, pb_grpc

log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 256
DEADLINE_SLACK_S = 0.25


class StreamStalled(Exception):
    """The client stopped reading a stream for longer than the stall timeout."""


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(
        self, engine: Engine, metrics: ServerMetrics, stall_timeout_s: float = 20.0, expose_model_path: bool = False
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        self._stall_timeout_s = stall_timeout_s
        self._expose_model_path = expose_model_path
        self._live_request_ids: set[str] = set()
        self.accepting = False  # false while loading and once draining
        self.in_flight = 0
        # Called when a request's failure left the engine unable to serve again (app.py turns
        # health NOT_SERVING); the engine's own errors tell each later caller why.
        self.on_engine_failure: Callable[[], Awaitable[None]] | None = None

    async def drain(self, grace_s: float) -> bool:
        """Refuses new work and waits for calls in flight; true if all ended within the grace period."""
        self.accepting = False
        deadline = asyncio.get_running_loop().time() + grace_s
        while self.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight == 0

    # ---- RPCs -------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        recorder = self._metrics.recorder("Generate")
        async with self._guard(context, recorder), self._claim_request_id(request.request_id) as request_id:
            text_parts: list[str] = []
            token_ids: list[int] = []
            last = None
            outputs = self._outputs(request, request_id, recorder)
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    text_parts.append(output.text)
                    token_ids.extend(output.token_ids)
                    last = output
            return pb.GenerateResponse(
                request_id=request_id,
                text="".join(text_parts),
                token_ids=token_ids,
                finish_reason=last.finish_reason,
                usage=_usage(last),
                ttft_ms=recorder.ttft_ms,
                e2e_ms=recorder.e2e_ms,
            )

    async def GenerateStream(self, request: pb.GenerateRequest, context) -> None:
        # context.write rather than yield: a write that HTTP/2 flow control holds back (a client
        # that stopped reading) can then be given up after the stall timeout, freeing the slot.
        recorder = self._metrics.recorder("GenerateStream")
        async with self._guard(context, recorder), self._claim_request_id(request.request_id) as request_id:
            held_ids: list[int] = []
            outputs = self._outputs(request, request_id, recorder)
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    held_ids.extend(output.token_ids)
                    # One chunk per new piece of text: tokens whose text is held back ride along later.
                    if not output.text and output.finish_reason is None:
                        continue
                    chunk = pb.GenerateChunk(request_id=request_id, text=output.text, token_ids=held_ids)
                    if output.finish_reason is not None:
                        chunk.finish_reason = output.finish_reason
                        chunk.usage.CopyFrom(_usage(output))
                    held_ids = []
                    await self._write(context, chunk)

    async def _write(self, context, chunk: pb.GenerateChunk) -> None:
        try:
            await asyncio.wait_for(context.write(chunk), self._stall_timeout_s)
        except TimeoutError:
            raise StreamStalled(
                f"the stream was cancelled: the client read nothing for {self._stall_timeout_s:g} s "
                "(--stream-stall-timeout)"
            ) from None
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            # grpc refuses to send on a call that the client has cancelled or abandoned; that is the
            # client going away, as a cancel is, not a bug of ours.
            log.debug("stream write failed, the call is over: %r", exc)
            raise asyncio.CancelledError() from exc

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        async with self._guard(context, self._metrics.recorder("Score", generates=False)):
            self._require_accepting()
            return convert.score_response(await self._engine.score(request.text))

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfo:
        async with self._guard(context, self._metrics.recorder("GetModelInfo", generates=False)):
            self._require_accepting()
            info = self._engine.info()
            # The server's directory layout is not the caller's business unless the operator says so.
            return convert.model_info(info if self._expose_model_path else dataclasses.replace(info, model_path=""))

    # ---- shared plumbing --------------------------------------------------------------

    async def _outputs(self, request: pb.GenerateRequest, request_id: str, recorder: RequestRecorder):
        self._require_accepting()
        params = convert.sampling_params(request.params)
        # aclosing: when the call ends early the engine's generator is closed right here,
        # which is what stops the model's work, rather than whenever it is garbage collected.
        generation = self._engine.generate(
            request.prompt, params, request_id, use_chat_template=request.use_chat_template
        )
        async with contextlib.aclosing(generation):
            async for output in generation:
                recorder.on_output(output.started_at, output.prompt_tokens, len(output.token_ids))
                yield output

    def _require_accepting(self) -> None:
        if not self.accepting:
            raise EngineUnavailable(
                "server is not accepting work (model loading or shutting down); retry when health reports SERVING"
            )

    @contextlib.asynccontextmanager
    async def _claim_request_id(self, given: str):
        if len(given) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequest(f"request_id is at most {MAX_REQUEST_ID_CHARS} characters, got {len(given)}")
        request_id = given or uuid.uuid4().hex
        if request_id in self._live_request_ids:
            raise InvalidRequest(
                f"request_id {request_id!r} is already used by a request in flight; use a unique id or leave it empty"
            )
        self._live_request_ids.add(request_id)
        try:
            yield request_id
        finally:
            self._live_request_ids.discard(request_id)

    @contextlib.asynccontextmanager
    async def _guard(self, context, recorder: RequestRecorder | None):
        """Maps what the call raised to its status, and counts that status before it leaves.

        A client that scrapes /metrics right after its answer must find that answer counted,
        so the count comes before ``context.abort`` sends the status, not after it.
        """
        status = grpc.StatusCode.OK
        counted = False

        def count(final: grpc.StatusCode) -> None:
            nonlocal counted
            if recorder is not None and not counted:
                recorder.finish(final.name)
            counted = True

        self.in_flight += 1
        try:
            yield
            count(status)
        except StreamStalled as exc:
            # Not context.abort: the status would queue behind the chunk the client is not reading,
            # and this handler (and its slot) would wait with it. Setting it lets the handler end now.
            log.warning("%s", exc)
            self._metrics.count_stall()
            count(grpc.StatusCode.CANCELLED)
            context.set_code(grpc.StatusCode.CANCELLED)
            context.set_details(str(exc))
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away or its deadline passed; grpc has already ended the call.
            # A client stops at its own deadline, which is a little earlier than the server's copy
            # (set when the call's headers were read): a cancel that close to the end is the deadline.
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= DEADLINE_SLACK_S
            count(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            status, message = status_for(exc)
            count(status)
            if not self._engine.healthy and self.on_engine_failure is not None:
                await self.on_engine_failure()
            await context.abort(status, message)
        finally:
            self.in_flight -= 1
            count(grpc.StatusCode.UNKNOWN)  # only if nothing above counted: a bug here, still counted


def _usage(output) -> pb.Usage:
    return pb.Usage(prompt_tokens=output.prompt_tokens, completion_tokens=output.completion_tokens)
