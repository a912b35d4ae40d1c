"""What the server and its engine process say to each other: a kind for each message, and its fields.

The shape is vLLM V1's (``EngineCoreRequestType`` and ``EngineCoreRequest`` between
``AsyncLLM`` and ``EngineCore``): an enum names each kind and a dataclass holds each
message, pickled over a ``multiprocessing`` connection.  Both sides dispatch on ``kind``.

The parent opens with ``Setup``; the child answers ``Ready`` or ``StartFailed`` once its
engine has started or could not.  Then the parent sends ``Stream``, ``Cancel``, ``Call``
and ``Stop``; the child sends ``Update``: every ``Reply`` one turn of its event loop made,
with the engine's load and health.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar

from engines import errors
from engines.base import EngineConfig, EngineInfo, EngineLoad, EngineRequest


class RequestKind(enum.Enum):
    """What the parent asks of the child."""

    STREAM = "stream"  # generate one request
    CANCEL = "cancel"  # the parent let a request go: stop its work
    CALL = "call"  # one of the engine's calls that answer once (Method)
    STOP = "stop"  # shut the engine down and exit


class Method(enum.Enum):
    """The engine's calls that answer once, by their name on ``Engine``."""

    SCORE_IDS = "score_ids"
    PROMPT_LOGPROBS = "prompt_logprobs"


class ReplyKind(enum.Enum):
    """What the child says of one request."""

    OUTPUT = "output"  # one GenerationOutput of a stream
    END = "end"  # a stream ended without a last output (the engine's iterator stopped)
    RESULT = "result"  # a Call's answer
    ERROR = "error"  # a stream or call failed


# ---- the start -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """The first message: which engine to build, as the registry builds it, and how to log."""

    engine: str
    config: EngineConfig
    log_level: int


@dataclass(frozen=True)
class Ready:
    """The engine started; ``score_context`` is its own answer, which the parent cannot ask for later."""

    info: EngineInfo
    score_context: int


@dataclass(frozen=True)
class StartFailed:
    error: ErrorInfo


# ---- parent to child -------------------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    kind: ClassVar[RequestKind] = RequestKind.STREAM
    number: int
    request: EngineRequest


@dataclass(frozen=True)
class Cancel:
    kind: ClassVar[RequestKind] = RequestKind.CANCEL
    number: int


@dataclass(frozen=True)
class Call:
    kind: ClassVar[RequestKind] = RequestKind.CALL
    number: int
    method: Method
    args: tuple[Any, ...]


@dataclass(frozen=True)
class Stop:
    kind: ClassVar[RequestKind] = RequestKind.STOP


ToChild = Stream | Cancel | Call | Stop


# ---- child to parent -------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """``payload``: a GenerationOutput (OUTPUT), a Call's answer (RESULT), an ErrorInfo (ERROR), None (END)."""

    number: int
    kind: ReplyKind
    payload: Any = None


@dataclass(frozen=True)
class Update:
    """What one turn of the child's loop made, and the engine's load and health (sent at least every tick)."""

    replies: tuple[Reply, ...]
    load: EngineLoad
    failure: str | None


# ---- errors across the socket ----------------------------------------------------------------


@dataclass(frozen=True)
class ErrorInfo:
    """An exception as it crosses: its class's name, its message and the request field it names."""

    name: str
    message: str
    field: str | None = None

    @classmethod
    def of(cls, exc: BaseException) -> ErrorInfo:
        return cls(type(exc).__name__, str(exc), getattr(exc, "field", None))

    def rebuilt(self) -> Exception:
        """The engine's own error classes come back as themselves; anything else is a failure inside it."""
        if self.name == "InvalidRequest":
            return errors.InvalidRequest(self.message, field=self.field)
        kind = getattr(errors, self.name, None)
        if isinstance(kind, type) and issubclass(kind, errors.EngineError):
            return kind(self.message)
        return RuntimeError(f"{self.name}: {self.message}" if self.message else self.name)
