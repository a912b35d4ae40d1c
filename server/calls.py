"""The request path every front end shares: gRPC (servicer.py) and HTTP (http_app.py) call into it.

What a call goes through is written once, here, so the same input gets the same answer and
the same count whichever front end it came by:

- the accepting check (loading, draining);
- claiming the request id (unique among the calls in flight on either front end);
- generating, with each output recorded through the request's ``RequestRecorder`` (tokens,
  time to first token, inter-token latency);
- the outcome: what the call raised becomes a status name through server/errors.py, counted in
  ``yayi_requests_total`` (with the front end's ``api`` label) before the answer leaves, and an
  engine that cannot recover is reported at once.

Front ends then deliver the outcome in their own form: ``CallFailed`` carries the status name
and the message, never a protocol type.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import cast

from engines.base import Engine, GenerationOutput
from engines.errors import EngineUnavailable, InvalidRequest
from engines.params import SamplingParams
from server.errors import status_for
from server.metrics import RequestRecorder, ServerMetrics
from server.serving_state import ServingState

log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 256
OK = "OK"
CANCELLED = "CANCELLED"


class StreamStalled(Exception):
    """The client stopped reading a stream for longer than the stall timeout."""


class CallFailed(Exception):
    """A call's outcome, already counted: the status name (a gRPC code's name) and the message for the client.

    ``stalled``: the client stopped reading, so nothing more can be sent to it.  ``field``: the
    request field at fault, as the refusing code named it (engines' InvalidRequest.field).
    ``retry_after_s``: a refusal's hint of when to come back (engines' QueueFull.retry_after_s).
    """

    def __init__(
        self,
        status: str,
        message: str,
        stalled: bool = False,
        field: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.stalled = stalled
        self.field = field
        self.retry_after_s = retry_after_s


def forget_traceback(exc: BaseException | None) -> None:
    """Drops the tracebacks of ``exc`` and the exceptions it chains, once its answer is made.

    A traceback holds every frame it passed, and so the request those frames parsed; asyncio's
    tasks close a cycle through it (a task holds its exception, the exception a frame, the frame
    the task), which only a full collection frees.  A refused request must not stay in memory
    until then: a flood of bad requests grew the server by hundreds of MB between collections.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if exc.__traceback__ is not None:
            traceback.clear_frames(exc.__traceback__)
            exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


class Calls:
    """``state``: the server's ServingState (server/serving_state.py), which app.py moves; Calls reads
    whether work is accepted and reports an engine a request left unable to serve.  Without one, a
    Calls of its own accepts no work."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, state: ServingState | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.state = state if state is not None else ServingState()
        self.in_flight = 0
        self._live_request_ids: set[str] = set()

    async def wait_for_in_flight(self, grace_s: float) -> bool:
        """Waits for calls in flight on every front end; true if all ended within ``grace_s``."""
        deadline = asyncio.get_running_loop().time() + grace_s
        while self.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight == 0

    def require_accepting(self) -> None:
        if not self.state.accepting:
            raise EngineUnavailable(
                "server is not accepting work (model loading or shutting down); retry when health reports SERVING"
            )

    @contextlib.asynccontextmanager
    async def claim_request_id(self, given: str):
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

    async def outputs(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str,
        recorder: RequestRecorder,
        use_chat_template: bool = False,
    ) -> AsyncGenerator[GenerationOutput, None]:
        self.require_accepting()
        # aclosing: when the call ends early the engine's generator is closed right here,
        # which is what stops the model's work, rather than whenever it is garbage collected.
        generation = cast(
            AsyncGenerator[GenerationOutput, None],
            self.engine.generate(prompt, params, request_id, use_chat_template=use_chat_template),
        )
        async with contextlib.aclosing(generation):
            async for output in generation:
                recorder.on_output(output.started_at, output.prompt_tokens, len(output.token_ids))
                yield output

    @contextlib.asynccontextmanager
    async def call(
        self,
        recorder: RequestRecorder | None,
        cancelled_status: Callable[[], str] = lambda: CANCELLED,
        passthrough: tuple[type[BaseException], ...] = (),
        client_gone: tuple[type[BaseException], ...] = (),
    ):
        """One call from start to outcome: counts its final status once, before the answer leaves.

        A client that scrapes /metrics right after its answer must find that answer counted, so the
        count comes before ``CallFailed`` reaches the front end that sends it.

        ``cancelled_status``: the status of a call whose client went away (gRPC tells a passed deadline
        from a cancel). ``passthrough``: a front end's own control flow, re-raised untouched.
        ``client_gone``: a front end's exceptions that mean the client went away, counted as cancelled.
        """
        counted = False

        def count(final: str) -> None:
            nonlocal counted
            if recorder is not None and not counted:
                recorder.finish(final)
            counted = True

        self.in_flight += 1
        try:
            yield
            count(OK)
        except CallFailed as failure:
            count(failure.status)  # a call inside this one ended so (a prompt of several): this one too
            raise
        except StreamStalled as exc:
            log.warning("%s", exc)
            self.metrics.count_stall()
            count(CANCELLED)
            raise CallFailed(CANCELLED, str(exc), stalled=True) from None
        except (asyncio.CancelledError, GeneratorExit):
            count(cancelled_status())
            raise
        except Exception as exc:
            if isinstance(exc, passthrough):
                raise
            if isinstance(exc, client_gone):
                count(cancelled_status())
                raise
            status, message = status_for(exc)
            count(status.name)
            if not self.engine.healthy:
                # Reported before this call's error leaves: a client that then asks health reads NOT_SERVING.
                await self.state.lose_engine()
            raise CallFailed(
                status.name,
                message,
                field=getattr(exc, "field", None),
                retry_after_s=getattr(exc, "retry_after_s", None),
            ) from exc
        finally:
            self.in_flight -= 1
            count("UNKNOWN")  # only if nothing above counted: a bug here, still counted
