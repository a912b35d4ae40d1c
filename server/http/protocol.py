"""OpenAI's request bodies, one typed model per route, each with one conversion to the engine's types.

As vLLM's ``entrypoints/openai`` protocol modules do, a body is validated by a pydantic model:
``CompletionRequest``, ``ChatCompletionRequest``, ``TokenizeRequest``, ``DetokenizeRequest``.
The sampling values themselves are validated by ``SamplingParams``, the same code as gRPC's,
so the same bad value gets the same message; what the models check is what JSON leaves open
and protobuf would have settled: the types, the field names, and the fields we do not serve.

Every refusal is a ``FieldError`` whose ``field`` is OpenAI's ``param``, taken from the error
itself: pydantic's location for a type error, ``InvalidRequest.field`` for a range check.

- Strict types: pydantic's lax mode would take ``"5"`` or ``true`` as ``5``; a client's
  ``true`` is never a number here.
- An unknown field is refused by name rather than ignored (vLLM ignores it with a warning), as
  is a field we cannot honour, so no client believes it got ``n=2`` or logprobs when it did not.
- ``null`` means "not given".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, ValidationInfo, field_validator
from pydantic import model_validator as _model_validator
from pydantic_core import PydanticCustomError

from engines.errors import InvalidRequest
from engines.params import MAX_LOGPROBS, SamplingParams
from engines.prompts import Conversation

StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]
StrictStr = Annotated[str, Strict()]
Number = Annotated[float, Strict()]  # an int is a fine float; a bool or a string is not

MAX_PROMPTS = 64  # prompts in one completions request; each one is a request to the engine
# What our SamplingParams' fields are called in an OpenAI body, for the ``param`` of a refused value.
_HTTP_NAME = {"max_new_tokens": "max_tokens"}
# OpenAI's "developer" role is the newer name of "system"; chat templates know only "system".
_ROLE_ALIASES = {"developer": "system"}
_MESSAGE_KEYS = {"role", "content", "name"}
# Fields that ask for something we do not do; accepted only with the value that asks for nothing.
_NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "response_format": ({"type": "text"},),
    "min_tokens": (0,),
}
_WHY_NOT = {
    "n": "one choice per request",
    "best_of": "one choice per request",
    "suffix": "no insertion after a suffix",
    "tools": "no tool calling",
    "tool_choice": "no tool calling",
    "response_format": "plain text only",
}
# What a value of the wrong type should have been, by pydantic's error type.
_EXPECTED = {
    "int_type": "an integer",
    "bool_type": "true or false",
    "float_type": "a number",
    "string_type": "a string",
    "model_type": "an object",
    "dict_type": "an object",
    "list_type": "a list",
}

# A prompt as the engine takes it: text, token ids, or (chat) a Conversation.
Prompt = str | tuple[int, ...] | Conversation


class FieldError(InvalidRequest):
    """A bad request field; ``field`` is its name as the client sent it (OpenAI's error ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message, field=param)


@dataclass(frozen=True)
class GenerateCall:
    """One parsed /v1/completions or /v1/chat/completions request: one choice per prompt."""

    prompts: tuple[Prompt, ...]
    params: SamplingParams
    chat: bool
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    continuous_usage: bool  # stream_options.continuous_usage_stats (vLLM's): usage on every chunk
    echo: bool = False  # completions: the prompt (text, and log-probabilities if asked) comes first
    logprobs: int | None = None  # alternatives per token in the answer; None: no log-probabilities

    @property
    def prompt(self) -> Prompt:
        return self.prompts[0]


# ---- the bytes -----------------------------------------------------------------------------------


def parse_json(raw: bytes) -> dict:
    """The body as a dict, or InvalidRequest: whatever the bytes, nothing else is raised."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidRequest("the request body nests too deeply to parse; send a flatter JSON object") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError among them
        raise InvalidRequest(f"the request body is not valid JSON ({exc}); send a JSON object") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    # A lone surrogate can only come from a \uD800-\uDFFF escape; where none is, none is looked for.
    if _SURROGATE_ESCAPE.search(raw):
        _check_unicode(body)
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


def _no_constant(name: str) -> None:
    # Python's json takes NaN and Infinity, which JSON does not have and no field here can use.
    raise ValueError(f"{name} is not a JSON value")


def _check_unicode(body: dict) -> None:
    """Refuses a string (value or key, at any depth) holding a lone UTF-16 surrogate, naming where."""
    stack: list[tuple[str, object]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, f"{path}.{_safe(key)}" if path else _safe(key), "the key")
                stack.append((f"{path}.{_safe(key)}" if path else _safe(key), item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{index}]", item) for index, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path, "the value of")


def _check_text(text: str, path: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FieldError(
            path,
            f"{what} '{path}' holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not "
            "valid Unicode; send UTF-8 text",
        ) from None


def _safe(text: str) -> str:
    """A client's key as it can be echoed back: what UTF-8 cannot encode is escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _shown(value: object, limit: int = 60) -> str:
    """A client's value as an error message quotes it: JSON, cut short."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---- the models ----------------------------------------------------------------------------------


def _refusal(param: str, message: str) -> PydanticCustomError:
    """A refusal raised inside validation: pydantic collects it with the others, ``param`` rides along."""
    return PydanticCustomError("refused", "{message}", {"message": message, "param": param})


class Request(BaseModel):
    """What every route's body shares: unknown fields refused, strict types, the served model."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    TAKES: ClassVar[str] = "this route takes"  # the start of the list of fields an unknown one is told
    HIDDEN: ClassVar[frozenset[str]] = frozenset()  # fields accepted but not worth telling about

    model: StrictStr | None = None

    @classmethod
    def parse(cls, body: dict, served_model: str) -> Self:
        """The body as this route's request, or the first thing wrong with it as a FieldError."""
        given = {key: value for key, value in body.items() if value is not None}  # null means "not given"
        try:
            return cls.model_validate(given, context={"served_model": served_model})
        except ValidationError as exc:
            raise cls._field_error(exc) from None

    @field_validator("model")
    @classmethod
    def _served(cls, name: str, info: ValidationInfo) -> str:
        # No model at all is taken as "the one served", as vLLM does; a different one is refused by name.
        served = (info.context or {}).get("served_model")
        if name and served is not None and name != served:
            raise _refusal("model", f"the model {name!r} does not exist; this server serves {served!r}")
        return name

    @classmethod
    def _field_error(cls, exc: ValidationError) -> FieldError:
        errors = exc.errors(include_url=False)
        # An unknown field first: whatever else is wrong, the client may have misspelt what it meant.
        error = next((error for error in errors if error["type"] == "extra_forbidden"), errors[0])
        kind, given = error["type"], error.get("input")
        param = (error.get("ctx") or {}).get("param") or _path(error["loc"])
        if kind == "extra_forbidden":
            if len(error["loc"]) > 1:
                return FieldError(param, f"unsupported field {param!r}")
            takes = ", ".join(sorted(set(cls.model_fields) - cls.HIDDEN))
            return FieldError(param, f"unsupported field {param!r}; {cls.TAKES} {takes}")
        if kind == "float_type" and isinstance(given, int) and not isinstance(given, bool):
            return FieldError(param, f"{param} is out of range, got {_shown(given)}")  # hundreds of digits
        if kind in _EXPECTED:
            return FieldError(param, f"{param} must be {_EXPECTED[kind]}, got {_shown(given)}")
        if kind == "refused":
            return FieldError(param, error["msg"])
        return FieldError(param, f"{param}: {error['msg']}")


def _path(loc: tuple) -> str:
    """pydantic's location as a client names the field: ``messages[0].content``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM's: the usage on every chunk


class GenerateRequest(Request):
    """What completions and chat share: the sampling fields, streaming, and the fields we do not serve."""

    TAKES = "this server takes"
    HIDDEN = frozenset({"user"})
    # Asked for something we do not do: only the value that asks for nothing is taken (see _NO_OP_VALUES).
    n: Any = None
    best_of: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    response_format: Any = None
    min_tokens: Any = None
    user: Any = None  # an end-user id for the caller's own abuse tracking: nothing to do with generation
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    seed: StrictInt | None = None
    stop: Any = None
    # vLLM's extension: generation ends at any of these ids (SamplingParams checks them, as on gRPC).
    stop_token_ids: list[StrictInt] | None = None
    repetition_penalty: Number | None = None
    ignore_eos: StrictBool | None = None

    # check_fields=False: suffix is completions' field, tools and tool_choice chat's.
    @field_validator(*_NO_OP_VALUES, check_fields=False)
    @classmethod
    def _no_op(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name or ""
        allowed = _NO_OP_VALUES[name]
        # True == 1 to Python, never to a client: n=true is not n=1.
        if not any(
            value is option if isinstance(value, bool) or isinstance(option, bool) else value == option
            for option in allowed
        ):
            why = f": {_WHY_NOT[name]}" if name in _WHY_NOT else ""
            raise _refusal(
                name, f"{name}={_shown(value)} is not supported{why}; leave it out or send {json.dumps(allowed[0])}"
            )
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: Any) -> tuple[str, ...]:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(text, str) for text in stop):
            raise _refusal("stop", "stop must be a string or a list of strings")
        return tuple(stop)

    @_model_validator(mode="after")
    def _stream_options_need_a_stream(self) -> Self:
        if self.stream_options is not None and not self.stream:
            raise _refusal("stream_options", "stream_options is only allowed with stream=true")
        return self

    def _sampling_params(self, given: dict[str, Any]) -> SamplingParams:
        """The fields every generate route shares, with the route's own in ``given``; absent fields take
        SamplingParams' own defaults, as gRPC's unset fields do."""
        for name in ("temperature", "top_p", "repetition_penalty", "seed", "ignore_eos", "stop", "stop_token_ids"):
            value = getattr(self, name)
            if value is not None:
                given[name] = value
        if self.top_k is not None:
            # vLLM's "off" is -1 (also accepted here, as vLLM accepts it); ours is 0.
            given["top_k"] = 0 if self.top_k == -1 else self.top_k
        try:
            return SamplingParams(**given)
        except InvalidRequest as exc:
            # SamplingParams' own message, as gRPC gives it, in the body's words (max_tokens, not max_new_tokens).
            param = self._http_name(exc.field)
            if exc.field is None or param is None:
                raise
            raise FieldError(param, str(exc).replace(exc.field, param)) from None

    def _http_name(self, field: str | None) -> str | None:
        return self._limit_name() if field == "max_new_tokens" else http_param(field)

    def _limit_name(self) -> str:
        """The field that set max_new_tokens, as the client sent it."""
        return "max_tokens"

    def _call(self, prompts: tuple[Prompt, ...], params: SamplingParams, **route: Any) -> GenerateCall:
        options = self.stream_options or StreamOptions()
        return GenerateCall(
            prompts=prompts,
            params=params,
            stream=self.stream,
            include_usage=options.include_usage or options.continuous_usage_stats,
            continuous_usage=options.continuous_usage_stats,
            **route,
        )


class CompletionRequest(GenerateRequest):
    """``POST /v1/completions``: OpenAI's four prompt shapes, echo, and the legacy logprobs."""

    suffix: Any = None
    # OpenAI's four shapes, validated into a tuple of prompts: text or token ids each.
    prompt: Any = Field(default=None, validate_default=True)
    echo: StrictBool = False  # the prompt (text, and log-probabilities if asked) comes first
    logprobs: StrictInt | None = None  # how many alternatives per token (0: the chosen token's only)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt: Any) -> tuple[str | tuple[int, ...], ...]:
        if isinstance(prompt, str):
            return (prompt,)
        if not isinstance(prompt, list) or not prompt:
            raise _refusal(
                "prompt",
                "prompt is required: a string, a list of strings, a list of token ids, or a list of those lists",
            )
        if all(_is_token_id(item) for item in prompt):
            return (tuple(prompt),)
        if len(prompt) > MAX_PROMPTS:
            raise _refusal("prompt", f"at most {MAX_PROMPTS} prompts in one request, got {len(prompt)}")
        prompts: list[str | tuple[int, ...]] = []
        for index, item in enumerate(prompt):
            if isinstance(item, str):
                prompts.append(item)
            elif isinstance(item, list) and item and all(_is_token_id(token) for token in item):
                prompts.append(tuple(item))
            else:
                raise _refusal(
                    f"prompt[{index}]",
                    f"prompt[{index}] must be a string or a non-empty list of token ids (integers >= 0)",
                )
        return tuple(prompts)

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, logprobs: int) -> int:
        if not 0 <= logprobs <= MAX_LOGPROBS:
            raise _refusal("logprobs", f"logprobs must be between 0 and {MAX_LOGPROBS}, got {logprobs}")
        return logprobs

    @_model_validator(mode="after")
    def _one_prompt_per_stream(self) -> Self:
        if self.stream and len(self.prompt) > 1:
            count = len(self.prompt)
            raise _refusal("prompt", f"stream=true takes one prompt, got {count}; send them one request each")
        return self

    def to_sampling_params(self) -> SamplingParams:
        given: dict[str, Any] = {}
        if self.max_tokens is not None:
            given["max_new_tokens"] = self.max_tokens
        if self.logprobs is not None:
            given["logprobs"] = self.logprobs
        if self.echo and (self.logprobs is not None or self.max_tokens == 0):
            # The prompt's own log-probabilities; with max_tokens 0 they are all there is (scoring).
            given["prompt_logprobs"] = self.logprobs or 0
        return self._sampling_params(given)

    def _http_name(self, field: str | None) -> str | None:
        return "logprobs" if field == "prompt_logprobs" else super()._http_name(field)

    def to_call(self) -> GenerateCall:
        params = self.to_sampling_params()
        return self._call(self.prompt, params, chat=False, echo=self.echo, logprobs=self.logprobs)


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class ChatCompletionRequest(GenerateRequest):
    """``POST /v1/chat/completions``: messages, max_completion_tokens, logprobs=true with top_logprobs."""

    tools: Any = None
    tool_choice: Any = None
    # {role, content} objects, validated into a Conversation.
    messages: Any = Field(default=None, validate_default=True)
    max_completion_tokens: StrictInt | None = None  # the newer name of max_tokens; it wins when both are sent
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None  # alternatives per token, with logprobs=true

    @field_validator("messages")
    @classmethod
    def _messages(cls, messages: Any) -> Conversation:
        return conversation(messages)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, top: int) -> int:
        if not 0 <= top <= MAX_LOGPROBS:
            raise _refusal("top_logprobs", f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {top}")
        return top

    @_model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> Self:
        if self.top_logprobs and not self.logprobs:
            raise _refusal("top_logprobs", "top_logprobs needs logprobs=true")
        return self

    def _limit_name(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def to_sampling_params(self) -> SamplingParams:
        given: dict[str, Any] = {}
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if limit is not None:
            given["max_new_tokens"] = limit
        if self.logprobs:
            given["logprobs"] = self.top_logprobs or 0
        return self._sampling_params(given)

    def to_call(self) -> GenerateCall:
        params = self.to_sampling_params()
        return self._call((self.messages,), params, chat=True, logprobs=params.logprobs)


def conversation(messages: Any) -> Conversation:
    """Chat messages as the engine's Conversation: text content only, roles as chat templates name them."""
    if not isinstance(messages, list) or not messages:
        raise _refusal("messages", "messages is required: a list of {role, content} objects")
    turns = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _refusal(where, f"{where} must be an object with role and content")
        for key, value in message.items():
            if key not in _MESSAGE_KEYS and value is not None:
                raise _refusal(f"{where}.{key}", f"unsupported field '{where}.{key}': messages take role and content")
        role = message.get("role")
        if not isinstance(role, str):
            raise _refusal(f"{where}.role", f"{where}.role must be a string")
        turns.append((_ROLE_ALIASES.get(role, role), _content_text(message.get("content"), where)))
    try:
        return Conversation(turns)
    except InvalidRequest as exc:
        raise _refusal("messages", str(exc)) from None


def _content_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _refusal(
                    f"{where}.content[{index}]",
                    f"{where}.content[{index}] must be {{'type': 'text', 'text': ...}}: this server takes text only",
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise _refusal(f"{where}.content", f"{where}.content must be a string or a list of text parts")


class TokenizeRequest(Request):
    """``POST /tokenize``, vLLM's body: a prompt, or chat messages rendered by the chat template."""

    prompt: StrictStr | None = None
    messages: Any = None  # validated into a Conversation
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False

    @field_validator("messages")
    @classmethod
    def _messages(cls, messages: Any) -> Conversation:
        return conversation(messages)

    @_model_validator(mode="after")
    def _prompt_or_messages(self) -> Self:
        if self.messages is None and self.prompt is None:
            raise _refusal("prompt", "prompt is required and must be a string (or send messages)")
        return self


class DetokenizeRequest(Request):
    """``POST /detokenize``, vLLM's body: token ids (the vocabulary's bounds are the route's to check)."""

    tokens: Any = Field(default=None, validate_default=True)

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, tokens: Any) -> list[int]:
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise _refusal("tokens", "tokens is required: a list of token ids")
        return tokens


def generate_call(body: dict, served_model: str, chat: bool) -> GenerateCall:
    """A /v1/completions or /v1/chat/completions body as the call to run."""
    return (ChatCompletionRequest if chat else CompletionRequest).parse(body, served_model).to_call()


def http_param(field: str | None) -> str | None:
    """A field named by the engine (SamplingParams' names) as an OpenAI body names it."""
    return None if field is None else _HTTP_NAME.get(field, field)
