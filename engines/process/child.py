"""An engine run in a child process of the server, behind a socket (hf-cb's ``--engine-process``).

Why: on a CPU the continuous-batching manager's loop is Python between the forward
passes, and in the server's process it takes turns at the GIL with the event loop, the
gRPC and HTTP front ends and the detokenizer.  vLLM V1 answers the same problem by running
its engine loop in a process of its own (``EngineCore`` behind ``AsyncLLM``); this is that
shape for an engine of ours.

The parent keeps the request path of engines/base.py (checks, tokenization, admission,
token texts) and the child runs the engine's own part: ``_check_params``, ``_stream``,
``_score_ids`` and ``_prompt_logprobs`` of the same engine class, started there without
the option.  What crosses is small and already a delta: the request (token ids and
sampling), each ``GenerationOutput`` (the tokens since the last one, with their text), a
cancel, and with every message the engine's load and health.  The child sends what one
turn of its event loop produced as one message.

A child that dies fails every request in flight as unavailable and turns the engine
unhealthy; a parent that dies closes the socket, and the child shuts its engine and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

from engines import errors
from engines.admission import Admission
from engines.base import Engine, EngineConfig, EngineInfo, EngineLoad, EngineRequest, ScoreResult

log = logging.getLogger(__name__)

# How often an idle child still tells its load and health.
_TICK_S = 0.1
_STOP_TIMEOUT_S = 60
# The calls a parent may make of the child's engine, besides a stream.
_CALLS = ("_score_ids", "_prompt_logprobs")


def in_child_process(engine_class: type[Engine]) -> type[Engine]:
    """``engine_class`` served from a child process: the same name, options and offers."""
    return type(
        f"ChildProcess{engine_class.__name__}",
        (ChildProcessEngine,),
        {"name": engine_class.name, "Options": engine_class.Options, "offers_logprobs": engine_class.offers_logprobs},
    )


# ---- the parent's side ------------------------------------------------------------------


class ChildProcessEngine(Engine):
    """Relays the engine's own part to a child process; see the module's docstring."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._info: EngineInfo | None = None
        self._child_load = EngineLoad(running=0, waiting=0)
        self._ids = itertools.count()
        self._inboxes: dict[int, asyncio.Queue] = {}  # streams and calls in flight, by id
        self._gone = False  # the child closed its end

    async def start(self) -> None:
        from transformers import AutoTokenizer

        ours, theirs = socket.socketpair()
        with theirs:
            # The child's engine is the same class without the option; test faults are armed there.
            options: Any = self.options  # an engine's Options that has the field, or this class is not chosen
            child_config = replace(self.config, options=replace(options, engine_process=False))
            self._process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno())], pass_fds=(theirs.fileno(),)
            )
        self._conn = Connection(ours.detach())
        self._conn.send((self.name, child_config, logging.getLogger().getEffectiveLevel()))
        try:
            kind, payload = await asyncio.to_thread(self._conn.recv)  # loading takes seconds to minutes
        except (EOFError, OSError):
            exited = f"the {self.name} engine process exited while starting"
            kind, payload = "failed", ("EngineUnavailable", exited, None)
        if kind != "ready":
            await asyncio.to_thread(self._process.wait)
            raise _rebuilt(payload)
        self._info = payload
        log.info("%s runs in engine process %d", self.name, self._process.pid)
        asyncio.get_running_loop().add_reader(self._conn.fileno(), self._on_readable)
        tokenizer = await asyncio.to_thread(
            AutoTokenizer.from_pretrained, payload.model_path, trust_remote_code=self.config.trust_remote_code
        )
        self._open(
            tokenizer,
            payload.max_context,
            payload.vocab_size,
            Admission(payload.max_concurrent_requests, self.config.max_queue),
        )

    async def shutdown(self) -> None:
        await super().shutdown()
        if self._process is None:
            return
        if not self._gone:
            self._send("stop")
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

    # ---- requests -------------------------------------------------------------------------

    async def _stream(self, request: EngineRequest):
        number, inbox = self._opened()
        self._send("stream", number, request)
        ended = False
        try:
            while True:
                kind, payload = await inbox.get()
                ended = kind != "output" or payload.finish_reason is not None
                if kind == "error":
                    raise _rebuilt(payload)
                if kind == "output":
                    yield payload
                if ended:
                    return
        finally:
            del self._inboxes[number]
            if not ended and not self._gone:
                self._send("cancel", number)  # the child closes the engine's stream: its work stops there

    async def _score_ids(self, ids: list[int]) -> ScoreResult:
        return await self._call("_score_ids", ids)

    async def _prompt_logprobs(self, request: EngineRequest):
        return await self._call("_prompt_logprobs", request)

    async def _call(self, method: str, *args) -> Any:
        number, inbox = self._opened()
        try:
            self._send("call", number, method, args)
            kind, payload = await inbox.get()
        finally:
            del self._inboxes[number]
        if kind == "error":
            raise _rebuilt(payload)
        return payload

    def _opened(self) -> tuple[int, asyncio.Queue]:
        self._require_ready()  # once the child is gone: failed, or shutting down
        number = next(self._ids)
        inbox: asyncio.Queue = asyncio.Queue()
        self._inboxes[number] = inbox
        return number, inbox

    def _send(self, *message) -> None:
        try:
            self._loaded(self._conn).send(message)
        except OSError:  # the child is gone; its reader will say so
            pass

    # ---- what the child says ----------------------------------------------------------------

    def _on_readable(self) -> None:
        conn = self._loaded(self._conn)
        try:
            while True:
                entries, load, failure = conn.recv()
                self._child_load = load
                if failure is not None and self._failure is None:
                    self._failure = failure
                for number, kind, payload in entries:
                    inbox = self._inboxes.get(number)
                    if inbox is not None:  # else: a request the parent has already let go
                        inbox.put_nowait((kind, payload))
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
            self._failure = f"the {self.name} engine process {self._exit_status()}"
            log.error("%s; the engine stops serving", self._failure)
            why = f"{self._failure}; restart the server"
        for inbox in self._inboxes.values():
            inbox.put_nowait(("error", ("EngineUnavailable", why, None)))
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


# ---- errors across the socket -------------------------------------------------------------


def _described(exc: BaseException) -> tuple[str, str, str | None]:
    return type(exc).__name__, str(exc), getattr(exc, "field", None)


def _rebuilt(described: tuple[str, str, str | None]) -> Exception:
    """The engine's own error classes come back as themselves; anything else is a failure inside it."""
    name, message, field = described
    if name == "InvalidRequest":
        return errors.InvalidRequest(message, field=field)
    kind = getattr(errors, name, None)
    if isinstance(kind, type) and issubclass(kind, errors.EngineError):
        return kind(message)
    return RuntimeError(f"{name}: {message}" if message else name)


# ---- the child's side ---------------------------------------------------------------------


class _Child:
    """Serves one engine to the parent over ``conn`` until told to stop or the parent goes."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.engine: Engine | None = None
        self.tasks: dict[int, asyncio.Task] = {}
        self.outbox: list[tuple[int, str, Any]] = []
        self.stopped = asyncio.Event()

    async def serve(self, name: str, config: EngineConfig) -> None:
        from engines.registry import create_engine

        try:
            engine = create_engine(name, config)
            await engine.start()
        except BaseException as exc:  # the parent says why the engine did not start
            log.exception("the engine did not start")
            self.conn.send(("failed", _described(exc)))
            return
        self.engine = engine
        try:
            self.conn.send(("ready", engine.info()))
        except OSError:  # the parent went while the model loaded
            await engine.shutdown()
            return
        loop = asyncio.get_running_loop()
        loop.add_reader(self.conn.fileno(), self._on_readable)
        ticker = asyncio.ensure_future(self._tick())
        await self.stopped.wait()
        loop.remove_reader(self.conn.fileno())
        ticker.cancel()
        # Streams still open end as the engine ends them on shutdown (cancelled), and the parent hears it.
        await engine.shutdown()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        with contextlib.suppress(OSError):
            self._flush()

    def _on_readable(self) -> None:
        try:
            while True:
                self._dispatch(*self.conn.recv())
                if not self.conn.poll():
                    return
        except (EOFError, OSError):  # the parent is gone
            self.stopped.set()

    def _dispatch(self, kind: str, *args) -> None:
        if kind == "stream":
            number, request = args
            self.tasks[number] = asyncio.ensure_future(self._relay(number, request))
        elif kind == "cancel":
            task = self.tasks.get(args[0])
            if task is not None:
                task.cancel()
        elif kind == "call":
            number, method, call_args = args
            self.tasks[number] = asyncio.ensure_future(self._answer(number, method, call_args))
        elif kind == "stop":
            self.stopped.set()

    async def _relay(self, number: int, request: EngineRequest) -> None:
        engine = self._engine()
        try:
            engine._check_params(request.params)
            async with contextlib.aclosing(engine._stream(request)) as stream:
                async for output in stream:
                    self._emit(number, "output", output)
            self._emit(number, "end", None)
        except asyncio.CancelledError:
            pass  # the parent let the request go; closing the stream above stopped its work
        except Exception as exc:
            self._emit(number, "error", _described(exc))
        finally:
            del self.tasks[number]

    async def _answer(self, number: int, method: str, args) -> None:
        try:
            if method not in _CALLS:
                raise RuntimeError(f"unknown call {method!r}")
            self._emit(number, "reply", await getattr(self._engine(), method)(*args))
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            self._emit(number, "error", _described(exc))
        finally:
            del self.tasks[number]

    def _emit(self, number: int, kind: str, payload) -> None:
        if not self.outbox:
            asyncio.get_running_loop().call_soon(self._flush)  # what this turn of the loop makes, in one message
        self.outbox.append((number, kind, payload))

    def _flush(self) -> None:
        engine = self._engine()
        entries, self.outbox = self.outbox, []
        failure = None if engine.healthy else (engine._failure or f"the {engine.name} engine failed")
        try:
            self.conn.send((entries, engine.load(), failure))
        except OSError:
            self.stopped.set()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(_TICK_S)
            if not self.outbox:
                self._flush()

    def _engine(self) -> Engine:
        assert self.engine is not None
        return self.engine


def main() -> None:
    # Ctrl-C reaches the whole process group and a SIGTERM may too: the server drains its requests first and
    # then stops this process itself (or closes the socket by dying), so the child leaves both signals to it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(int(sys.argv[1]))
    name, config, log_level = conn.recv()
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s engine-process[{os.getpid()}] %(name)s: %(message)s"
    )
    asyncio.run(_Child(conn).serve(name, config))


if __name__ == "__main__":
    main()
