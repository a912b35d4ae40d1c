"""The engine process's main: ``python -m engines.process.child FD``, started by engines/process/proxy.py.

It builds the engine named in the parent's ``Setup`` with the registry's own constructor
(``registry.build_engine``, test faults armed here), starts it, and serves its seam to the
parent over the socket ``FD`` until told to stop or the parent goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from multiprocessing.connection import Connection

from engines.base import Engine, EngineRequest
from engines.process import messages
from engines.process.messages import ErrorInfo, Method, Reply, ReplyKind, RequestKind
from engines.registry import build_engine

log = logging.getLogger(__name__)

# How often an idle child still tells its load and health.
_TICK_S = 0.1


class _Child:
    """Serves one engine to the parent over ``conn`` until told to stop or the parent goes."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.engine: Engine | None = None
        self.tasks: dict[int, asyncio.Task] = {}
        self.outbox: list[Reply] = []
        self.stopped = asyncio.Event()

    async def serve(self, setup: messages.Setup) -> None:
        try:
            engine = build_engine(setup.engine, setup.config)
            await engine.start()
        except BaseException as exc:  # the parent says why the engine did not start
            log.exception("the engine did not start")
            self.conn.send(messages.StartFailed(ErrorInfo.of(exc)))
            return
        self.engine = engine
        try:
            self.conn.send(messages.Ready(engine.info(), engine.score_context()))
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
                self._dispatch(self.conn.recv())
                if not self.conn.poll():
                    return
        except (EOFError, OSError):  # the parent is gone
            self.stopped.set()

    def _dispatch(self, message: messages.ToChild) -> None:
        match message.kind:
            case RequestKind.STREAM:
                assert isinstance(message, messages.Stream)
                self.tasks[message.number] = asyncio.ensure_future(self._relay(message.number, message.request))
            case RequestKind.CANCEL:
                assert isinstance(message, messages.Cancel)
                task = self.tasks.get(message.number)
                if task is not None:
                    task.cancel()
            case RequestKind.CALL:
                assert isinstance(message, messages.Call)
                self.tasks[message.number] = asyncio.ensure_future(self._answer(message))
            case RequestKind.STOP:
                self.stopped.set()

    async def _relay(self, number: int, request: EngineRequest) -> None:
        engine = self._engine()
        try:
            engine.check_params(request.params)
            async with contextlib.aclosing(engine.stream_tokens(request)) as stream:
                async for output in stream:
                    self._emit(Reply(number, ReplyKind.OUTPUT, output))
            self._emit(Reply(number, ReplyKind.END))
        except asyncio.CancelledError:
            pass  # the parent let the request go; closing the stream above stopped its work
        except Exception as exc:
            self._emit(Reply(number, ReplyKind.ERROR, ErrorInfo.of(exc)))
        finally:
            del self.tasks[number]

    async def _answer(self, call: messages.Call) -> None:
        engine = self._engine()
        result: object
        try:
            match call.method:
                case Method.SCORE_IDS:
                    result = await engine.score_ids(*call.args)
                case Method.PROMPT_LOGPROBS:
                    result = await engine.prompt_logprobs(*call.args)
            self._emit(Reply(call.number, ReplyKind.RESULT, result))
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            self._emit(Reply(call.number, ReplyKind.ERROR, ErrorInfo.of(exc)))
        finally:
            del self.tasks[call.number]

    def _emit(self, reply: Reply) -> None:
        if not self.outbox:
            asyncio.get_running_loop().call_soon(self._flush)  # what this turn of the loop makes, in one message
        self.outbox.append(reply)

    def _flush(self) -> None:
        engine = self._engine()
        replies, self.outbox = tuple(self.outbox), []
        try:
            self.conn.send(messages.Update(replies, engine.load(), engine.failure))
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
    setup: messages.Setup = conn.recv()
    logging.basicConfig(
        level=setup.log_level, format=f"%(asctime)s %(levelname)s engine-process[{os.getpid()}] %(name)s: %(message)s"
    )
    asyncio.run(_Child(conn).serve(setup))


if __name__ == "__main__":
    main()
