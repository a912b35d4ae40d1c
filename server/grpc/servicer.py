"""The Inference service: wire messages in, engine calls, wire messages out.

It knows the Engine interface and nothing of any engine's insides.  The request path it
shares with the HTTP front end (the accepting check, request ids, per-output metrics, the
outcome and its count) is server/calls.py; what is left here is gRPC's own: protobuf in and
out, deadlines, writes held back by flow control, and sending the status.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math

import grpc

from server.calls import CANCELLED, CallFailed, Calls, StreamStalled
from server.grpc import convert
from server.grpc.wire import pb, pb_grpc
from server.metrics import RequestRecorder
from server.whole_output import WholeOutput

log = logging.getLogger(__name__)

DEADLINE_SLACK_S = 0.25
# Trailing metadata with a refusal's retry hint in milliseconds, the key gRPC's retry policy reads.
PUSHBACK_KEY = "grpc-retry-pushback-ms"


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, calls: Calls, stall_timeout_s: float = 20.0, expose_model_path: bool = False) -> None:
        self._calls = calls
        self._engine = calls.engine
        self._metrics = calls.metrics
        self._stall_timeout_s = stall_timeout_s
        self._expose_model_path = expose_model_path

    # ---- RPCs -------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        recorder = self._metrics.recorder("Generate")
        async with self._guard(context, recorder), self._calls.claim_request_id(request.request_id) as request_id:
            whole = WholeOutput()
            outputs = self._outputs(request, request_id, recorder)
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    whole.add(output)
            assert whole.finish_reason is not None  # every generation ends with an output that carries its finish
            return pb.GenerateResponse(
                request_id=request_id,
                text=whole.text,
                token_ids=whole.token_ids,
                finish_reason=whole.finish_reason,
                usage=_usage(whole),
                ttft_ms=recorder.ttft_ms,
                e2e_ms=recorder.e2e_ms,
                logprobs=convert.token_logprobs(whole.logprobs),
                prompt_logprobs=convert.token_logprobs(whole.prompt_logprobs),
            )

    async def GenerateStream(self, request: pb.GenerateRequest, context) -> None:
        # context.write rather than yield: a write that HTTP/2 flow control holds back (a client
        # that stopped reading) can then be given up after the stall timeout, freeing the slot.
        recorder = self._metrics.recorder("GenerateStream")
        async with self._guard(context, recorder), self._calls.claim_request_id(request.request_id) as request_id:
            held = WholeOutput()  # what the next chunk carries
            outputs = self._outputs(request, request_id, recorder)
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    held.add(output)
                    # One chunk per new piece of text: tokens whose text is held back ride along later
                    # (the prompt's log-probabilities ride on the first chunk).
                    if not output.text and output.finish_reason is None:
                        continue
                    chunk = pb.GenerateChunk(
                        request_id=request_id,
                        text=held.text,
                        token_ids=held.token_ids,
                        logprobs=convert.token_logprobs(held.logprobs),
                        prompt_logprobs=convert.token_logprobs(held.prompt_logprobs),
                    )
                    if held.finish_reason is not None:
                        chunk.finish_reason = held.finish_reason
                        chunk.usage.CopyFrom(_usage(held))
                    held = WholeOutput()
                    await self._write(context, chunk)

    async def _write(self, context, chunk: pb.GenerateChunk) -> None:
        try:
            # asyncio.timeout, not wait_for: no task per chunk on a path taken for every token.
            async with asyncio.timeout(self._stall_timeout_s):
                await context.write(chunk)
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
            self._calls.require_accepting()
            return convert.score_response(await self._engine.score(request.text))

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfo:
        async with self._guard(context, self._metrics.recorder("GetModelInfo", generates=False)):
            self._calls.require_accepting()
            info = self._engine.info()
            # The server's directory layout is not the caller's business unless the operator says so.
            return convert.model_info(info if self._expose_model_path else dataclasses.replace(info, model_path=""))

    # ---- gRPC's side of the shared path -------------------------------------------------

    def _outputs(self, request: pb.GenerateRequest, request_id: str, recorder: RequestRecorder):
        return self._calls.outputs(
            request.prompt,
            convert.sampling_params(request.params),
            request_id,
            recorder,
            use_chat_template=request.use_chat_template,
        )

    @contextlib.asynccontextmanager
    async def _guard(self, context, recorder: RequestRecorder | None):
        """The shared outcome (counted in calls.py), sent as a gRPC status."""

        def cancelled_status() -> str:
            # The client went away or its deadline passed; grpc has already ended the call.
            # A client stops at its own deadline, which is a little earlier than the server's copy
            # (set when the call's headers were read): a cancel that close to the end is the deadline.
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= DEADLINE_SLACK_S
            return grpc.StatusCode.DEADLINE_EXCEEDED.name if expired else CANCELLED

        try:
            async with self._calls.call(recorder, cancelled_status, passthrough=(grpc.aio.AbortError,)):
                yield
        except CallFailed as failure:
            if failure.stalled:
                # Not context.abort: the status would queue behind the chunk the client is not reading,
                # and this handler (and its slot) would wait with it. Setting it lets the handler end now.
                context.set_code(grpc.StatusCode.CANCELLED)
                context.set_details(failure.message)
                return
            if failure.retry_after_s is not None:
                # gRPC's own retry policy waits this long before its next attempt (gRFC A6, server pushback).
                context.set_trailing_metadata(((PUSHBACK_KEY, str(math.ceil(failure.retry_after_s * 1000))),))
            await context.abort(grpc.StatusCode[failure.status], failure.message)


def _usage(whole: WholeOutput) -> pb.Usage:
    return pb.Usage(prompt_tokens=whole.prompt_tokens, completion_tokens=whole.completion_tokens)
