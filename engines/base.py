"""The Engine interface every backend implements, and the plain types it speaks.

The server drives an engine only through this module: it never sees tensors, caches
or threads.  ``generate`` is an async generator; when its consumer stops iterating
(client cancel, disconnect, deadline) the generator is closed, and the engine must stop
the model's work for that request right there, not at the end of the completion.

The request path is written once, here: readiness, prompt checks, tokenization (or the
checks of a prompt given as token ids), the context check, the admission slot, scoring a
prompt without generating, and the text of each log-probability's token.

What an engine supplies (the seam; the request path here and the engine process,
engines/process/, call only these):

- required: ``start`` (load the model, end with ``_open``), ``info`` and
  ``stream_tokens(request)``, which generates one admitted request from its token ids;
- optional, with defaults: ``score_ids(ids)`` (Score; default: unsupported),
  ``prompt_logprobs(request)`` (the prompt's log-probabilities without generating;
  default: unsupported), ``check_params(params)`` (refuse what the engine cannot do before a
  slot is taken; default: all is fine), ``score_context()`` (the longest text Score takes;
  default: the context), ``load()``, ``shutdown()`` and ``load_tokenizer(info)`` (the
  tokenizer of a started engine, for a parent that runs it in a child process);
- class declarations: ``name``, ``Options``, ``requires``, ``offers_logprobs`` and
  ``runs_in_child_process``.

Health: an engine records that it cannot serve again with ``fail(reason)`` (the first
reason stays), and everything reads it through the ``failure`` property (``healthy`` is
``failure is None``).  An engine whose failure lives in a part it does not own (a thread, a
process) may override ``failure`` with a read that writes nothing.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from engines import remote_code
from engines.admission import Admission
from engines.errors import EngineUnavailable, InvalidRequest, Unsupported
from engines.logprobs import TokenLogprob, TokenTexts
from engines.options import NoOptions
from engines.params import SamplingParams, check_against_model, check_prompt_ids, check_prompt_text, check_score_length
from engines.prompts import PromptTokenizer

_T = TypeVar("_T")
_LOADING = "engine is still loading the model; retry when health reports SERVING"


@dataclass(frozen=True)
class EngineConfig:
    """What the command line tells an engine; options it does not know it ignores."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_concurrency: int | None = None  # None: the engine's own default
    max_queue: int = 64
    max_queue_wait_s: float | None = None  # refuse a request whose estimated wait for a slot is longer
    options: object | None = None  # an instance of the engine's Options; None: its defaults
    # Run the engine in a child process of the server (engines/process/); only for an engine
    # whose class declares runs_in_child_process.
    engine_process: bool = False
    # Load a folder that names classes of its own (auto_map): their Python files run (engines/remote_code.py).
    trust_remote_code: bool = False
    chat_template: str | None = None  # Jinja text that replaces the tokenizer's own template (or gives one)
    memory_budget: int | None = None  # bytes the model may take (engines/memory.py); None: what is free
    skip_memory_check: bool = False
    test_faults: tuple = ()  # engines/faults.py: set only by tests, with --allow-test-faults


@dataclass(frozen=True)
class GenerationOutput:
    """One step of a completion: the tokens made since the previous output.

    ``text`` is whole UTF-8 characters only and may be empty while a multi-byte
    character or a possible stop string is held back.  The last output of a request
    has ``finish_reason`` set.  The first output carries ``started_at``, the
    ``time.monotonic()`` at which the engine began work on the request (its queue wait ends).

    ``logprobs``: when the request asked for them, one entry per id in ``token_ids``.
    ``prompt_logprobs``: when asked, on the first output only, one entry per prompt token,
    the first None (nothing comes before it).  Engines leave the texts in them empty; the
    request path below fills them.
    """

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    started_at: float | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


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
    custom_code: tuple[str, ...] = ()  # the model folder's own Python files that ran (--trust-remote-code)


@dataclass(frozen=True)
class EngineLoad:
    running: int
    waiting: int
    kv_cache_usage: float | None = None  # 0..1, engines with a paged KV cache only


@dataclass(frozen=True)
class EngineRequest:
    """A request that passed every check: what ``stream_tokens`` generates from."""

    request_id: str
    # The text as sent ("" for token ids), kept for logs and test-only fault markers (engines/faults.py).
    prompt: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams


class Engine(abc.ABC):
    """A backend. ``start`` loads the model and ends with ``_open(...)``; everything else needs it started."""

    name: ClassVar[str] = "engine"
    Options: ClassVar[type] = NoOptions
    # Top-level packages the engine needs beyond torch and transformers; the registry checks
    # them before start so a missing one is reported as what to install, not as a traceback.
    requires: ClassVar[tuple[str, ...]] = ()
    # Whether ``stream_tokens`` honours SamplingParams.logprobs and prompt_logprobs and ``prompt_logprobs``
    # is supplied; an engine that does not is refused such requests here, by name.
    offers_logprobs: ClassVar[bool] = False
    # Whether the engine may run in a child process of the server (EngineConfig.engine_process):
    # its part of the seam must then only take and give what pickles (engines/process/).
    runs_in_child_process: ClassVar[bool] = False

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.options = config.options if config.options is not None else self.Options()
        if not isinstance(self.options, self.Options):
            raise TypeError(f"engine {self.name} takes {self.Options.__name__}, got {type(self.options).__name__}")
        # Before anything loads: a folder with code of its own is refused unless it was trusted.
        self.custom_code = remote_code.checked(config.model, config.trust_remote_code)
        self._prompts: PromptTokenizer | None = None
        self._admission: Admission | None = None
        self._max_context = 0
        self._vocab_size = 0
        self._closing = False
        self._failure: str | None = None  # set by fail(), once the engine cannot serve again

    # ---- what each engine supplies ---------------------------------------------------

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    def info(self) -> EngineInfo: ...

    @abc.abstractmethod
    def stream_tokens(self, request: EngineRequest) -> AsyncGenerator[GenerationOutput, None]:
        """Generates one admitted request; closing the iterator must stop its work at once."""

    async def score_ids(self, ids: list[int]) -> ScoreResult:
        """The log-probability of the text ``ids`` (Score), at most ``score_context()`` of them."""
        raise Unsupported(f"engine {self.name} cannot score texts")

    async def prompt_logprobs(self, request: EngineRequest) -> tuple[TokenLogprob | None, ...]:
        """The prompt's log-probabilities, ``request.params.prompt_logprobs`` alternatives each, without generating."""
        raise Unsupported(f"engine {self.name} cannot return log-probabilities")

    def check_params(self, params: SamplingParams) -> None:
        """Refuses what this engine cannot do, before the request takes a slot (default: all is fine)."""

    def score_context(self) -> int:
        """The longest text, in tokens, that ``score_ids`` takes."""
        return self._max_context

    @classmethod
    def load_tokenizer(cls, info: EngineInfo):
        """The tokenizer a started engine encodes with, from its info alone: what a parent process
        needs where the engine runs in a child (default: transformers' tokenizer of the model folder)."""
        from transformers import AutoTokenizer

        # A child that ran the folder's own code had --trust-remote-code; its tokenizer may be that code too.
        return AutoTokenizer.from_pretrained(info.model_path, trust_remote_code=bool(info.custom_code))

    def _open(self, tokenizer, max_context: int, vocab_size: int, admission: Admission) -> None:
        """Called by ``start`` once the model is loaded: from here on requests are served."""
        if self.config.chat_template is not None:
            # On the one tokenizer every prompt, /tokenize and /tokenizer_info read.
            tokenizer.chat_template = self.config.chat_template
        self._prompts = PromptTokenizer(tokenizer, max_context, self.config.model)
        self._max_context = max_context
        self._vocab_size = vocab_size
        self._admission = admission

    @property
    def tokenizer(self):
        """The tokenizer requests are encoded with (after start)."""
        self._require_ready()
        return self._ready()[0].tokenizer

    # ---- the request path, the same for every engine ---------------------------------

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str, use_chat_template: bool = False
    ) -> AsyncIterator[GenerationOutput]:
        """``prompt``: text, or token ids used as they are (no template, no special tokens added)."""
        prompts, admission = self._ready()
        if isinstance(prompt, str):
            check_prompt_text(prompt)
            prompt_ids = tuple(await prompts.encode(prompt, use_chat_template))
        else:
            if use_chat_template:
                raise InvalidRequest(
                    "the chat template applies to a text prompt; a prompt of token ids is used as it is",
                    field="use_chat_template",
                )
            prompt_ids = check_prompt_ids(prompt, self._vocab_size)
            prompt = ""
        check_against_model(params, len(prompt_ids), self._max_context, self._vocab_size)
        self._check_logprobs_offered(params)
        self.check_params(params)
        async with admission.slot():
            self._require_ready()
            started_at = time.monotonic()
            request = EngineRequest(request_id, prompt, prompt_ids, params)
            texts = TokenTexts(prompts.tokenizer, prompt_ids)
            if params.max_new_tokens == 0:
                yield await self._scored_prompt(request, texts, started_at)
                return
            first = True
            async with contextlib.aclosing(self.stream_tokens(request)) as stream:
                async for output in stream:
                    # The engine's own start time (a batching engine's scheduling time) wins.
                    if first and output.started_at is None:
                        output = dataclasses.replace(output, started_at=started_at)
                    yield await self._with_token_texts(output, request, texts, first)
                    first = False

    def _check_logprobs_offered(self, params: SamplingParams) -> None:
        if not self.offers_logprobs and (params.logprobs is not None or params.prompt_logprobs is not None):
            field = "logprobs" if params.logprobs is not None else "prompt_logprobs"
            raise InvalidRequest(f"engine {self.name} cannot return log-probabilities", field=field)

    async def _scored_prompt(self, request: EngineRequest, texts: TokenTexts, started_at: float) -> GenerationOutput:
        """max_new_tokens 0: the prompt's log-probabilities and nothing generated (OpenAI's echo with max_tokens 0)."""
        entries = await self.prompt_logprobs(request)
        return GenerationOutput(
            text="",
            token_ids=(),
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=0,
            finish_reason="length",
            started_at=started_at,
            prompt_logprobs=await asyncio.to_thread(texts.prompt, entries),
        )

    async def _with_token_texts(
        self, output: GenerationOutput, request: EngineRequest, texts: TokenTexts, first: bool
    ) -> GenerationOutput:
        """The texts of the output's log-probability entries, once checked that what was asked is there."""
        params = request.params
        if params.logprobs is not None and len(output.logprobs) != len(output.token_ids):
            raise RuntimeError(
                f"engine {self.name} returned {len(output.logprobs)} log-probabilities for "
                f"{len(output.token_ids)} tokens"
            )
        wanted = params.prompt_logprobs is not None and first and output.finish_reason != "cancelled"
        prompt_entries = output.prompt_logprobs
        if wanted and (prompt_entries is None or len(prompt_entries) != len(request.prompt_ids)):
            raise RuntimeError(f"engine {self.name} did not return the prompt's log-probabilities on its first output")
        changes: dict[str, Any] = {}
        if output.logprobs:
            changes["logprobs"] = texts.generated(output.logprobs)
        if prompt_entries is not None:
            # A whole prompt's entries: decoded off the event loop.
            changes["prompt_logprobs"] = await asyncio.to_thread(texts.prompt, prompt_entries)
        return dataclasses.replace(output, **changes) if changes else output

    async def score(self, text: str) -> ScoreResult:
        prompts, admission = self._ready()
        check_prompt_text(text)
        ids = await prompts.encode_text(text, limit=self.score_context())
        check_score_length(len(ids), self.score_context())
        async with admission.slot():
            self._require_ready()
            return await self.score_ids(ids)

    def load(self) -> EngineLoad:
        if self._admission is None:
            return EngineLoad(running=0, waiting=0)
        return EngineLoad(running=self._admission.running, waiting=self._admission.waiting)

    def fail(self, reason: str) -> None:
        """Records that the engine cannot serve again without a restart; the first reason stays."""
        if self._failure is None:
            self._failure = reason

    @property
    def failure(self) -> str | None:
        """Why the engine cannot serve again without a restart (a dead device or engine process), or None."""
        return self._failure

    @property
    def healthy(self) -> bool:
        """False once the engine cannot serve again without a restart.

        The server then reports NOT_SERVING, so an orchestrator restarts it; a failure of one
        request (a bug, an out-of-memory) leaves the engine healthy.
        """
        return self.failure is None

    async def shutdown(self) -> None:
        self._closing = True

    def _ready(self) -> tuple[PromptTokenizer, Admission]:
        """The prompt tokenizer and the admission, once ``_require_ready`` lets the call through."""
        self._require_ready()
        return self._loaded(self._prompts), self._loaded(self._admission)

    @staticmethod
    def _loaded(part: _T | None) -> _T:
        """What ``start`` or ``_open`` sets (a model, a runtime), where only a started engine's calls get to."""
        if part is None:
            raise EngineUnavailable(_LOADING)
        return part

    def _require_ready(self) -> None:
        failure = self.failure
        if failure is not None:
            raise EngineUnavailable(f"the engine failed and cannot recover ({failure}); restart the server")
        if self._closing:
            raise EngineUnavailable("engine is shutting down")
        if self._admission is None:
            raise EngineUnavailable(_LOADING)
