"""OpenAI's response bodies, for the HTTP front end: the whole completion, the stream's chunks, and
the error shape.  The request bodies are server/http/protocol.py's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from server.errors import http_status
from server.http.protocol import GenerateCall

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
