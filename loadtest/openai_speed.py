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
import time

import requests
from gevent import GreenletExit
from locust import User, constant, events, task

from loadtest.prompts import load_prompts
from loadtest.sample_collector import install
from loadtest.token_stats import CUT, RequestSample

REQUEST_TYPE = "http"
STREAM_NAME = "completions stream"
TTFT_NAME = "completions stream TTFT"


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
            "model": options.served_model, "max_tokens": options.max_new_tokens,
            "temperature": options.temperature, "ignore_eos": options.ignore_eos, "stream": True,
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
        events = self.environment.events
        started = last = time.perf_counter()
        sample = RequestSample(started=time.time(), duration_s=0.0, tokens=0)
        try:
            with self.session.post(url, json=body, stream=True, timeout=self.timeout) as response:
                if response.status_code != 200:
                    sample.status = f"HTTP_{response.status_code}"
                    raise RuntimeError(f"{sample.status}: {response.text[:300]}")
                for line in response.iter_lines():
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    usage = json.loads(line[6:]).get("usage") or {}
                    count = (usage.get("completion_tokens") or 0) - sample.tokens
                    if count <= 0:
                        continue
                    now = time.perf_counter()
                    if sample.ttft_s is None:
                        sample.ttft_s = now - started
                    else:
                        sample.itl_s.extend([(now - last) / count] * count)
                    sample.tokens += count
                    last = now
            sample.completion_tokens = sample.tokens
        except GreenletExit:
            sample.duration_s = time.perf_counter() - started
            sample.status = CUT
            collector.add(sample)
            raise
        except (requests.RequestException, RuntimeError, ValueError) as error:
            sample.duration_s = time.perf_counter() - started
            sample.status = sample.status if sample.status.startswith("HTTP_") else type(error).__name__
            events.request.fire(request_type=REQUEST_TYPE, name=f"{STREAM_NAME} [{sample.status}]",
                                response_time=sample.duration_s * 1000, response_length=sample.tokens,
                                exception=error, context={})
            collector.add(sample)
            return sample
        sample.duration_s = time.perf_counter() - started
        collector.add(sample)
        if sample.ttft_s is not None:
            events.request.fire(request_type=REQUEST_TYPE, name=TTFT_NAME, response_time=sample.ttft_s * 1000,
                                response_length=0, exception=None, context={})
        events.request.fire(request_type=REQUEST_TYPE, name=STREAM_NAME, response_time=sample.duration_s * 1000,
                            response_length=sample.tokens, exception=None, context={})
        return sample
