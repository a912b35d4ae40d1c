"""The Engine interface every backend implements, and the plain types it speaks.

The server drives an engine only through this module: it never sees tensors, caches
or threads.  ``generate`` is an async generator; when its consumer stops iterating
(client cancel, disconnect, deadline) the generator is closed, and the engine must stop
the model's work for that request right there, not at the end of the completion.
"""

from __future__ import annotations

import abc
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .errors import Unsupported
from .params import SamplingParams


@dataclass(frozen=True)
class EngineConfig:
    """What the command line tells an engine; options it does not know it ignores."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_concurrency: int | None = None  # None: the engine's own default
    max_queue: int = 64
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationOutput:
    """One step of a completion: the tokens made since the previous output.

    ``text`` is whole UTF-8 characters only and may be empty while a multi-byte
    character or a possible stop string is held back.  The last output of a request
    has ``finish_reason`` set.  The first output carries ``started_at``, the
    ``time.monotonic()`` at which the engine began work on the request (its queue wait ends).
    """

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    started_at: float | None = None


@dataclass(frozen=True)
class ScoreResult:
    total_logprob: float
    token_count: int

    @property
    def perplexity(self) -> float:
        return math.exp(-self.total_logprob / self.token_count)


@dataclass(frozen=True)
class EngineInfo:
    engine: str
    model: str
    dtype: str
    device: str
    attention: str
    use_cache: bool
    max_context: int
    vocab_size: int
    max_concurrent_requests: int
    max_queue: int
    model_path: str = ""
    kv_cache_tokens: int = 0  # paged engines: tokens the KV cache holds across all sequences
    kv_cache_bytes: int = 0


@dataclass(frozen=True)
class EngineLoad:
    running: int
    waiting: int


class Engine(abc.ABC):
    """A backend. ``start`` loads the model; everything else needs it started."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    def generate(self, prompt: str, params: SamplingParams, request_id: str,
                 use_chat_template: bool = False) -> AsyncIterator[GenerationOutput]: ...

    @abc.abstractmethod
    def info(self) -> EngineInfo: ...

    async def score(self, text: str) -> ScoreResult:
        raise Unsupported(f"engine {self.config.model!r} on {type(self).__name__} cannot score texts")

    def load(self) -> EngineLoad:
        return EngineLoad(running=0, waiting=0)

    @property
    def healthy(self) -> bool:
        """False once the engine cannot serve again without a restart (a dead device or engine process).

        The server then reports NOT_SERVING, so an orchestrator restarts it; a failure of one
        request (a bug, an out-of-memory) leaves the engine healthy.
        """
        return True

    async def shutdown(self) -> None:
        return None
