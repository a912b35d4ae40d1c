"""OpenAI's request and response bodies, for the HTTP front end: plain dicts in, plain dicts out.

A request body becomes the prompt (text, or a ``Conversation`` for chat) and our neutral
``SamplingParams``; the values themselves are validated there, by the same code as gRPC's,
so the same bad value gets the same message.  What is checked here is only what JSON leaves
open and protobuf would have settled: the types, the field names, and the fields we do not
serve.  A field we cannot honour is refused by name rather than ignored, so no client
believes it got ``n=2`` or logprobs when it did not.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, fields
from typing import Any

from engines.errors import InvalidRequest
from engines.params import SamplingParams
from engines.prompts import Conversation
from server.errors import http_status


class FieldError(InvalidRequest):
    """A bad request field; ``field`` is its name as the client sent it (OpenAI's error ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message, field=param)


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
_COMMON = {
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "repetition_penalty",
    "ignore_eos",
    "user",  # an end-user id for the caller's own abuse tracking: nothing to do with generation
}
COMPLETION_FIELDS = frozenset(
    _COMMON | {"prompt", "echo", "logprobs"} | _NO_OP_VALUES.keys() - {"tools", "tool_choice"}
)
CHAT_FIELDS = frozenset(
    _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"} | _NO_OP_VALUES.keys() - {"suffix"}
)
MAX_LOGPROBS = 20  # OpenAI's and vLLM's bound on alternatives per token
MAX_PROMPTS = 64  # prompts in one completions request; each one is a request to the engine
# What our SamplingParams' fields are called in an OpenAI body, for the ``param`` of a refused value.
_HTTP_NAME = {"max_new_tokens": "max_tokens"}
_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
# OpenAI's "developer" role is the newer name of "system"; chat templates know only "system".
_ROLE_ALIASES = {"developer": "system"}
_MESSAGE_KEYS = {"role", "content", "name"}


# A prompt as the engine takes it: text, token ids, or (chat) a Conversation.
Prompt = str | tuple[int, ...] | Conversation


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


def parse_generate(body: dict, served_model: str, chat: bool) -> GenerateCall:
    body = {key: value for key, value in body.items() if value is not None}  # null means "not given"
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for name in body:
        if name not in allowed:
            raise FieldError(
                name, f"unsupported field {name!r}; this server takes {', '.join(sorted(allowed - {'user'}))}"
            )
    for name, no_op in _NO_OP_VALUES.items():
        if name in body and not _equal_any(body[name], no_op):
            why = f": {_WHY_NOT[name]}" if name in _WHY_NOT else ""
            given, default = _shown(body[name]), json.dumps(no_op[0])
            raise FieldError(name, f"{name}={given} is not supported{why}; leave it out or send {default}")
    check_model(body.get("model"), served_model)
    stream = typed(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and not stream:
        raise FieldError("stream_options", "stream_options is only allowed with stream=true")
    options = typed(body, "stream_options", dict, {})
    for key in options:
        if key not in ("include_usage", "continuous_usage_stats"):
            raise FieldError(f"stream_options.{key}", f"unsupported field 'stream_options.{key}'")
    include_usage = typed(options, "include_usage", bool, False, "stream_options.")
    continuous = typed(options, "continuous_usage_stats", bool, False, "stream_options.")
    prompts = (conversation(body),) if chat else _prompts(body)
    if stream and len(prompts) > 1:
        raise FieldError("prompt", f"stream=true takes one prompt, got {len(prompts)}; send them one request each")
    echo = False if chat else typed(body, "echo", bool, False)
    logprobs = _chat_logprobs(body) if chat else _completion_logprobs(body)
    return GenerateCall(
        prompts=prompts,
        params=sampling_params(body, chat, echo, logprobs),
        chat=chat,
        stream=stream,
        include_usage=include_usage or continuous,
        continuous_usage=continuous,
        echo=echo,
        logprobs=logprobs,
    )


def _completion_logprobs(body: dict) -> int | None:
    # OpenAI's legacy field: how many alternatives per token (0: the chosen token's only).
    logprobs = typed(body, "logprobs", int)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise FieldError("logprobs", f"logprobs must be between 0 and {MAX_LOGPROBS}, got {logprobs}")
    return logprobs


def _chat_logprobs(body: dict) -> int | None:
    # Chat's: logprobs=true, and top_logprobs alternatives per token beside it.
    wanted = typed(body, "logprobs", bool, False)
    top = typed(body, "top_logprobs", int)
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise FieldError("top_logprobs", f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {top}")
    if top and not wanted:
        raise FieldError("top_logprobs", "top_logprobs needs logprobs=true")
    return (top or 0) if wanted else None


def http_param(field: str | None) -> str | None:
    """A field named by the engine (SamplingParams' names) as an OpenAI body names it."""
    return None if field is None else _HTTP_NAME.get(field, field)


def check_model(name: object, served_model: str) -> None:
    # No model at all is taken as "the one served", as vLLM does; a different one is refused by name.
    if name in (None, ""):
        return
    if name != served_model:
        raise FieldError("model", f"the model {name!r} does not exist; this server serves {served_model!r}")


def sampling_params(body: dict, chat: bool, echo: bool = False, logprobs: int | None = None) -> SamplingParams:
    """Absent fields take SamplingParams' own defaults, as gRPC's unset fields do."""
    given: dict[str, Any] = {}
    limit_name = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    if limit_name in body:
        given["max_new_tokens"] = typed(body, limit_name, int)
    if logprobs is not None:
        given["logprobs"] = logprobs
    if echo and (logprobs is not None or given.get("max_new_tokens") == 0):
        # The prompt's own log-probabilities; with max_tokens 0 they are all there is (scoring).
        given["prompt_logprobs"] = logprobs or 0
    for name in ("temperature", "top_p", "repetition_penalty"):
        if name in body:
            try:
                given[name] = float(typed(body, name, float))
            except OverflowError:  # an integer of hundreds of digits
                raise FieldError(name, f"{name} is out of range, got {_shown(body[name])}") from None
    if "top_k" in body:
        # vLLM's "off" is -1 (also accepted here, as vLLM accepts it); ours is 0.
        top_k = typed(body, "top_k", int)
        given["top_k"] = 0 if top_k == -1 else top_k
    if "seed" in body:
        given["seed"] = typed(body, "seed", int)
    if "ignore_eos" in body:
        given["ignore_eos"] = typed(body, "ignore_eos", bool)
    if "stop" in body:
        stop = body["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(text, str) for text in stop):
            raise FieldError("stop", "stop must be a string or a list of strings")
        given["stop"] = tuple(stop)
    try:
        return SamplingParams(**given)
    except InvalidRequest as exc:
        # The message is SamplingParams' own, word for word as gRPC gives it; only the param is added.
        first_word = re.match(r"\w+", str(exc))
        named = first_word.group(0) if first_word and first_word.group(0) in _SAMPLING_FIELDS else None
        if named is None:
            raise
        raise FieldError(limit_name if named == "max_new_tokens" else _HTTP_NAME.get(named, named), str(exc)) from None


def _prompts(body: dict) -> tuple[str | tuple[int, ...], ...]:
    """OpenAI's four shapes: a string, a list of strings, a list of token ids, a list of such lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return (prompt,)
    if not isinstance(prompt, list) or not prompt:
        raise FieldError(
            "prompt", "prompt is required: a string, a list of strings, a list of token ids, or a list of those lists"
        )
    if all(_is_token_id(item) for item in prompt):
        return (tuple(prompt),)
    if len(prompt) > MAX_PROMPTS:
        raise FieldError("prompt", f"at most {MAX_PROMPTS} prompts in one request, got {len(prompt)}")
    prompts: list[str | tuple[int, ...]] = []
    for index, item in enumerate(prompt):
        if isinstance(item, str):
            prompts.append(item)
        elif isinstance(item, list) and item and all(_is_token_id(token) for token in item):
            prompts.append(tuple(item))
        else:
            raise FieldError(
                f"prompt[{index}]", f"prompt[{index}] must be a string or a non-empty list of token ids (integers >= 0)"
            )
    return tuple(prompts)


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def conversation(body: dict) -> Conversation:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise FieldError("messages", "messages is required: a list of {role, content} objects")
    turns = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise FieldError(where, f"{where} must be an object with role and content")
        for key, value in message.items():
            if key not in _MESSAGE_KEYS and value is not None:
                raise FieldError(f"{where}.{key}", f"unsupported field '{where}.{key}': messages take role and content")
        role = message.get("role")
        if not isinstance(role, str):
            raise FieldError(f"{where}.role", f"{where}.role must be a string")
        turns.append((_ROLE_ALIASES.get(role, role), _content_text(message.get("content"), where)))
    try:
        return Conversation(turns)
    except FieldError:
        raise
    except InvalidRequest as exc:
        raise FieldError("messages", str(exc)) from None


def _content_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise FieldError(
                    f"{where}.content[{index}]",
                    f"{where}.content[{index}] must be {{'type': 'text', 'text': ...}}: this server takes text only",
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise FieldError(f"{where}.content", f"{where}.content must be a string or a list of text parts")


def typed(body: dict, name: str, kind: type, default: Any = None, prefix: str = "") -> Any:
    if name not in body or body[name] is None:
        return default
    value = body[name]
    # bool is an int to Python, never to a client; an int is a fine float.
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok:
        noun = {bool: "true or false", int: "an integer", float: "a number", dict: "an object"}[kind]
        raise FieldError(prefix + name, f"{prefix}{name} must be {noun}, got {_shown(value)}")
    return value


def _equal_any(value: Any, allowed: tuple[Any, ...]) -> bool:
    # True == 1 to Python, never to a client: n=true is not n=1.
    return any(
        value is option if isinstance(value, bool) or isinstance(option, bool) else value == option
        for option in allowed
    )


# ---- response bodies ----------------------------------------------------------------------------

# Our finish reasons in OpenAI's words: the end-of-sequence token is a stop like a stop string.
_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}


def finish_reason(ours: str | None) -> str | None:
    return None if ours is None else _FINISH.get(ours, ours)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response_id(request_id: str, chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"


@dataclass(frozen=True)
class Choice:
    """One prompt's answer: its text (the echo included), how it ended, its log-probabilities."""

    text: str
    finish: str | None
    logprobs: dict | None = None


def completion(request_id: str, model: str, chat: bool, choices: list[Choice], usage_: dict) -> dict:
    bodies = []
    for index, choice in enumerate(choices):
        if chat:
            body = {"index": index, "message": {"role": "assistant", "content": choice.text}}
        else:
            body = {"index": index, "text": choice.text}
        body["logprobs"] = choice.logprobs
        body["finish_reason"] = finish_reason(choice.finish)
        bodies.append(body)
    return {
        "id": response_id(request_id, chat),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": bodies,
        "usage": usage_,
    }


class ChunkWriter:
    """The server-sent events of one stream, in OpenAI's chunk shape, as bytes ready to send."""

    def __init__(self, request_id: str, model: str, call: GenerateCall) -> None:
        self._chat = call.chat
        self._call = call
        self._head = {
            "id": response_id(request_id, call.chat),
            "object": "chat.completion.chunk" if call.chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        self._role_sent = False

    def chunk(self, text: str, finish: str | None, usage_: dict | None, logprobs: dict | None = None) -> bytes:
        if self._chat:
            delta = {"content": text} if text or finish is None else {}
            if not self._role_sent:
                delta = {"role": "assistant", **delta}  # the first chunk names the speaker, as OpenAI's does
                self._role_sent = True
            choice: dict[str, object] = {"index": 0, "delta": delta, "logprobs": logprobs}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs}
        choice["finish_reason"] = finish_reason(finish)
        body: dict[str, object] = {**self._head, "choices": [choice]}
        if self._call.include_usage:
            body["usage"] = usage_ if self._call.continuous_usage else None
        return event(body)

    def end(self, usage_: dict | None) -> bytes:
        """With include_usage, a last chunk with no choices and the usage; then [DONE]."""
        tail = event({**self._head, "choices": [], "usage": usage_}) if self._call.include_usage and usage_ else b""
        return tail + DONE


DONE = b"data: [DONE]\n\n"


def event(body: dict) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


# ---- errors -------------------------------------------------------------------------------------

_ERROR_TYPE = {
    "INVALID_ARGUMENT": "invalid_request_error",
    "UNAUTHENTICATED": "authentication_error",
    "RESOURCE_EXHAUSTED": "rate_limit_error",
    "UNAVAILABLE": "service_unavailable_error",
    "DEADLINE_EXCEEDED": "timeout_error",
    "UNIMPLEMENTED": "not_implemented_error",
}


def error_body(status: str, message: str, param: str | None = None) -> tuple[int, dict]:
    """OpenAI's error shape; ``code`` is the gRPC status name, the same word /metrics counts."""
    return http_status(status), {
        "error": {"message": message, "type": _ERROR_TYPE.get(status, "server_error"), "param": param, "code": status}
    }
