"""The server's side of an engine run in a child process: the engine's class, its seam relayed.

``in_child_process(engine_class)`` is the engine's own class with ``ChildProcessEngine`` in
front.  Everything the class declares (its name, Options, offers, tokenizer loading, and
whatever it adds) is the engine's by inheritance, so nothing is copied by name and nothing is
lost; the seam's instance hooks (engines/base.py: start, info, stream_tokens, score_ids,
prompt_logprobs, check_params, score_context, load, shutdown, failure) are relays to the child,
which builds the same engine the way the registry does (engines/process/child.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import subprocess
import sys
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

from engines.admission import Admission
from engines.base import Engine, EngineConfig, EngineInfo, EngineLoad, EngineRequest, ScoreResult
from engines.params import SamplingParams
from engines.process import messages
from engines.process.messages import ErrorInfo, Method, Reply, ReplyKind

log = logging.getLogger(__name__)

CHILD_MODULE = "engines.process.child"  # run as ``python -m``; the proxy never imports it
_STOP_TIMEOUT_S = 60


def in_child_process(engine_class: type[Engine]) -> type[Engine]:
    """``engine_class`` served from a child process: the same class, its seam relayed."""
    return type(f"ChildProcess{engine_class.__name__}", (ChildProcessEngine, engine_class), {})


class ChildProcessEngine(Engine):
    """Relays the engine's own part to a child process; see engines/process/__init__.py.

    Used only in front of an engine class (``in_child_process``), whose own ``__init__`` runs
    here too: an engine's constructor only declares its state, ``start`` loads.
    """

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._info: EngineInfo | None = None
        self._child_score_context = 0
        self._child_load = EngineLoad(running=0, waiting=0)
        self._ids = itertools.count()
        self._inboxes: dict[int, asyncio.Queue[Reply]] = {}  # streams and calls in flight, by number
        self._gone = False  # the child closed its end

    async def start(self) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", CHILD_MODULE, str(theirs.fileno())], pass_fds=(theirs.fileno(),)
            )
        self._conn = Connection(ours.detach())
        # The child builds the engine in its own process (test faults are armed there).
        child_config = replace(self.config, engine_process=False)
        self._conn.send(messages.Setup(self.name, child_config, logging.getLogger().getEffectiveLevel()))
        try:
            answer = await asyncio.to_thread(self._conn.recv)  # loading takes seconds to minutes
        except (EOFError, OSError):
            exited = f"the {self.name} engine process exited while starting"
            answer = messages.StartFailed(ErrorInfo("EngineUnavailable", exited))
        if not isinstance(answer, messages.Ready):
            await asyncio.to_thread(self._process.wait)
            raise answer.error.rebuilt()
        self._info = answer.info
        self._child_score_context = answer.score_context
        log.info("%s runs in engine process %d", self.name, self._process.pid)
        asyncio.get_running_loop().add_reader(self._conn.fileno(), self._on_readable)
        tokenizer = await asyncio.to_thread(self.load_tokenizer, answer.info)
        self._open(
            tokenizer,
            answer.info.max_context,
            answer.info.vocab_size,
            Admission(answer.info.max_concurrent_requests, self.config.max_queue, self.config.max_queue_wait_s),
        )

    async def shutdown(self) -> None:
        await super().shutdown()
        if self._process is None:
            return
        if not self._gone:
            self._send(messages.Stop())
        try:
            await asyncio.to_thread(self._process.wait, _STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.error("the %s engine process did not stop in %d s; killed", self.name, _STOP_TIMEOUT_S)
            self._process.kill()
            await asyncio.to_thread(self._process.wait)

    def info(self) -> EngineInfo:
        self._require_ready()
        return self._loaded(self._info)

    def load(self) -> EngineLoad:
        waiting = self._admission.waiting if self._admission is not None else 0
        return replace(self._child_load, waiting=self._child_load.waiting + waiting)

    @property
    def failure(self) -> str | None:
        """What the child reported, or its death: recorded here by ``fail`` as the messages come."""
        return self._failure

    def check_params(self, params: SamplingParams) -> None:
        """Nothing here: the child checks each request against its engine's state before its stream."""

    def score_context(self) -> int:
        return self._child_score_context

    # ---- requests -------------------------------------------------------------------------

    async def stream_tokens(self, request: EngineRequest):
        number, inbox = self._opened()
        self._send(messages.Stream(number, request))
        ended = False
        try:
            while True:
                reply = await inbox.get()
                ended = reply.kind is not ReplyKind.OUTPUT or reply.payload.finish_reason is not None
                if reply.kind is ReplyKind.ERROR:
                    raise reply.payload.rebuilt()
                if reply.kind is ReplyKind.OUTPUT:
                    yield reply.payload
                if ended:
                    return
        finally:
            del self._inboxes[number]
            if not ended and not self._gone:
                self._send(messages.Cancel(number))  # the child closes the engine's stream: its work stops there

    async def score_ids(self, ids: list[int]) -> ScoreResult:
        return await self._call(Method.SCORE_IDS, ids)

    async def prompt_logprobs(self, request: EngineRequest):
        return await self._call(Method.PROMPT_LOGPROBS, request)

    async def _call(self, method: Method, *args) -> Any:
        number, inbox = self._opened()
        try:
            self._send(messages.Call(number, method, args))
            reply = await inbox.get()
        finally:
            del self._inboxes[number]
        if reply.kind is ReplyKind.ERROR:
            raise reply.payload.rebuilt()
        return reply.payload

    def _opened(self) -> tuple[int, asyncio.Queue[Reply]]:
        self._require_ready()  # once the child is gone: failed, or shutting down
        number = next(self._ids)
        inbox: asyncio.Queue[Reply] = asyncio.Queue()
        self._inboxes[number] = inbox
        return number, inbox

    def _send(self, message: messages.ToChild) -> None:
        try:
            self._loaded(self._conn).send(message)
        except OSError:  # the child is gone; its reader will say so
            pass

    # ---- what the child says ----------------------------------------------------------------

    def _on_readable(self) -> None:
        conn = self._loaded(self._conn)
        try:
            while True:
                update: messages.Update = conn.recv()
                self._child_load = update.load
                if update.failure is not None:
                    self.fail(update.failure)
                for reply in update.replies:
                    inbox = self._inboxes.get(reply.number)
                    if inbox is not None:  # else: a request the parent has already let go
                        inbox.put_nowait(reply)
                if not conn.poll():
                    return
        except (EOFError, OSError):
            self._child_gone()

    def _child_gone(self) -> None:
        """The child closed its end: it stopped (shutdown) or died. Nothing in flight will be answered."""
        conn = self._loaded(self._conn)
        self._gone = True
        asyncio.get_running_loop().remove_reader(conn.fileno())
        if self._closing:
            why = "engine is shutting down"
        else:
            reason = f"the {self.name} engine process {self._exit_status()}"
            self.fail(reason)
            log.error("%s; the engine stops serving", reason)
            why = f"{reason}; restart the server"
        for number, inbox in self._inboxes.items():
            inbox.put_nowait(Reply(number, ReplyKind.ERROR, ErrorInfo("EngineUnavailable", why)))
        self._child_load = EngineLoad(running=0, waiting=0)

    def _exit_status(self) -> str:
        """How the child ended. Its socket closes as it exits, a moment before it can be waited for;
        a child that closed the socket and lives on is of no use, and is killed."""
        process = self._loaded(self._process)
        try:
            return f"exited (exit code {process.wait(timeout=1)})"
        except subprocess.TimeoutExpired:
            process.kill()
            return "closed its socket and was killed"
