"""The same speed test against an OpenAI-compatible server (vLLM's own, for comparison).

    locust -f loadtest/openai_speed.py --host http://127.0.0.1:8000 --served-model NAME --headless -u 4 -t 60s

Same prompts, same options, same per-request samples and summary as loadtest/speed.py, over
streaming ``/v1/completions``.  Tokens per chunk come from vLLM's continuous usage statistics
(the running completion-token count on every chunk), so a chunk of several tokens counts as
several, exactly as the gRPC user counts token ids.
"""

from __future__ import annotations

import itertools
import json

import requests  # noqa: E402
from gevent import GreenletExit
from locust import User, constant, events, task  # before requests: locust monkey-patches ssl for gevent

from loadtest.prompts import load_prompts
from loadtest.sample_collector import install
from loadtest.stream_clock import StreamClock, fire_failure, fire_success
from loadtest.token_stats import CUT, RequestSample

REQUEST_TYPE = "http"
STREAM_NAME = "completions stream"


def _arguments(group) -> None:
    group.add_argument("--served-model", default="", help="the model name the server serves (its --served-model-name)")


collector = install(events, _arguments)
_prompt_turn = itertools.count()


class OpenAISpeedUser(User):
    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.prompts = load_prompts(options.prompts_file)
        self.body = {
            "model": options.served_model,
            "max_tokens": options.max_new_tokens,
            "temperature": options.temperature,
            "ignore_eos": options.ignore_eos,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        self.chat_template = options.chat_template
        self.timeout = options.request_timeout
        self.session = requests.Session()

    def on_stop(self) -> None:
        self.session.close()

    @task
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
                        usage = json.loads(line[6:]).get("usage") or {}
                        clock.tokens((usage.get("completion_tokens") or 0) - clock.sample.tokens)
            clock.sample.completion_tokens = clock.sample.tokens
        except GreenletExit:
            collector.add(clock.finish(CUT))
            raise
        except (requests.RequestException, HttpStatus, ValueError) as error:
            status = f"HTTP_{error.status}" if isinstance(error, HttpStatus) else type(error).__name__
            sample = clock.finish(status)
            fire_failure(self.environment.events, REQUEST_TYPE, STREAM_NAME, sample, error)
            collector.add(sample)
            return sample
        sample = clock.finish()
        collector.add(sample)
        fire_success(self.environment.events, REQUEST_TYPE, STREAM_NAME, sample)
        return sample


class HttpStatus(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
