"""Timing one streamed request, whatever the protocol: token arrivals in, a RequestSample and
Locust's request events out.  The gRPC user and the OpenAI-server user both measure through it,
so their figures mean the same thing."""

from __future__ import annotations

import time

from loadtest.token_stats import OK, RequestSample


class StreamClock:
    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.sample = RequestSample(started=time.time(), duration_s=0.0, tokens=0)

    def tokens(self, count: int) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        if self.sample.ttft_s is None:
            self.sample.ttft_s = now - self.started
        else:
            # A chunk may carry several tokens (held back to finish a character or rule out a
            # stop string): spread its gap over them, as vLLM's serving benchmark does.
            self.sample.itl_s.extend([(now - self.last) / count] * count)
        self.sample.tokens += count
        self.last = now

    def finish(self, status: str = OK) -> RequestSample:
        self.sample.duration_s = time.perf_counter() - self.started
        self.sample.status = status
        return self.sample


def fire_success(events, request_type: str, name: str, sample: RequestSample) -> None:
    """Two rows in Locust's table: the whole request (length = tokens) and its time to first token."""
    if sample.ttft_s is not None:
        events.request.fire(request_type=request_type, name=f"{name} TTFT", response_time=sample.ttft_s * 1000,
                            response_length=0, exception=None, context={})
    events.request.fire(request_type=request_type, name=name, response_time=sample.duration_s * 1000,
                        response_length=sample.completion_tokens or sample.tokens, exception=None, context={})


def fire_failure(events, request_type: str, name: str, sample: RequestSample, exception: Exception) -> None:
    """The status in the name, so Locust's failure table groups failures by status code."""
    events.request.fire(request_type=request_type, name=f"{name} [{sample.status}]",
                        response_time=sample.duration_s * 1000, response_length=sample.tokens,
                        exception=exception, context={})
