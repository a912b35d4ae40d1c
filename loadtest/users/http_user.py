"""A Locust user that streams ``/v1/completions`` (or ``/v1/chat/completions``) from any
OpenAI-compatible server and measures each request itself: vLLM's own server
and our HTTP front end, both through loadtest/speed.py --api http.

Tokens per chunk come from the usage the server puts on every chunk
(``stream_options.continuous_usage_stats``, vLLM's extension, which our front end serves
too), so a chunk of several tokens counts as several, exactly as the gRPC user counts token
ids.  A server that gives usage only at the end (``transformers serve``) has each text chunk
counted as one token as it arrives, and the final usage adds any the chunks held back.
``ignore_eos`` is sent only when asked for: it is vLLM's extension, and a strict server
(``transformers serve``) refuses a field it does not know.  ``OPENAI_API_KEY``, when set, is
sent as the bearer token, as OpenAI's clients do.
"""

from __future__ import annotations

import itertools
import json
import os

import requests  # noqa: E402
from gevent import GreenletExit
from locust import User  # before requests is used: locust monkey-patches ssl for gevent

from loadtest.measure.prompts import load_prompts
from loadtest.measure.stream_clock import StreamClock, fire_failure, fire_success
from loadtest.measure.token_stats import CUT, RequestSample

REQUEST_TYPE = "http"
STREAM_NAME = "completions stream"

_prompt_turn = itertools.count()


def add_served_model_argument(group) -> None:
    group.add_argument(
        "--served-model", default="", help="the model name the server serves (vLLM's --served-model-name)"
    )


class StreamingOpenAIUser(User):
    abstract = True

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.prompts = load_prompts(options.prompts_file)
        self.body = {
            "model": options.served_model,
            "max_tokens": options.max_new_tokens,
            "temperature": options.temperature,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        if options.ignore_eos:
            self.body["ignore_eos"] = True
        self.chat_template = options.chat_template
        self.timeout = options.request_timeout
        self.session = requests.Session()
        if key := os.environ.get("OPENAI_API_KEY"):
            self.session.headers["Authorization"] = f"Bearer {key}"

    def on_stop(self) -> None:
        self.session.close()

    def generate(self) -> None:
        prompt = self.prompts[next(_prompt_turn) % len(self.prompts)]
        if self.chat_template:
            path, body = "/v1/chat/completions", {**self.body, "messages": [{"role": "user", "content": prompt}]}
        else:
            path, body = "/v1/completions", {**self.body, "prompt": prompt}
        self.stream(self.host.rstrip("/") + path, body)

    def stream(self, url: str, body: dict) -> RequestSample:
        clock = StreamClock()
        try:
            with self.session.post(url, json=body, stream=True, timeout=self.timeout) as response:
                if response.status_code != 200:
                    raise HttpStatus(response.status_code, response.text[:300])
                # chunk_size=None: hand over each line as it arrives (the default waits for 512 bytes).
                for line in response.iter_lines(chunk_size=None):
                    if line.startswith(b"data: ") and line != b"data: [DONE]":
                        chunk = json.loads(line[6:])
                        if usage := chunk.get("usage"):
                            clock.tokens(usage["completion_tokens"] - clock.sample.tokens)
                            clock.sample.completion_tokens = usage["completion_tokens"]
                        elif any(_text(choice) for choice in chunk.get("choices") or ()):
                            clock.tokens(1)
            if clock.sample.completion_tokens is None:
                clock.sample.completion_tokens = clock.sample.tokens
        except GreenletExit:
            self.record(clock.finish(CUT))
            raise
        except (requests.RequestException, HttpStatus, ValueError) as error:
            status = f"HTTP_{error.status}" if isinstance(error, HttpStatus) else type(error).__name__
            sample = clock.finish(status)
            fire_failure(self.environment.events, REQUEST_TYPE, STREAM_NAME, sample, error)
            self.record(sample)
            return sample
        sample = clock.finish()
        self.record(sample)
        fire_success(self.environment.events, REQUEST_TYPE, STREAM_NAME, sample)
        return sample

    def record(self, sample: RequestSample) -> None:
        """Where samples go: the locustfile's collector.  Subclasses override it."""


def _text(choice: dict) -> str:
    """A choice's new text: ``text`` in a completion chunk, ``delta.content`` in a chat one."""
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


class HttpStatus(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
