"""Timing one streamed request, whatever the protocol: token arrivals in, a RequestSample and
Locust's request events out.  The gRPC user and the OpenAI-server user both measure through it,
and so do the benchmarks and scripts outside Locust (``read``), so every TTFT means the same
thing: from just before the request is sent to the arrival of the first chunk with a token."""

from __future__ import annotations

import time

from loadtest.measure.token_stats import OK, RequestSample


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

    def chunk(self, chunk) -> None:
        """One ``GenerateStream`` chunk: its tokens, and the server's own count from the last chunk's usage."""
        self.tokens(len(chunk.token_ids))
        if chunk.HasField("usage"):
            self.sample.completion_tokens = chunk.usage.completion_tokens

    def read(self, chunks) -> RequestSample:
        """A whole gRPC stream read on this thread: for benchmarks and scripts outside Locust.
        Create the clock before opening the stream, so the request's sending is timed too."""
        for chunk in chunks:
            self.chunk(chunk)
        return self.finish()

    def finish(self, status: str = OK) -> RequestSample:
        self.sample.duration_s = time.perf_counter() - self.started
        self.sample.status = status
        return self.sample


def fire_success(events, request_type: str, name: str, sample: RequestSample) -> None:
    """Two rows in Locust's table: the whole request (length = tokens) and its time to first token."""
    if sample.ttft_s is not None:
        events.request.fire(
            request_type=request_type,
            name=f"{name} TTFT",
            response_time=sample.ttft_s * 1000,
            response_length=0,
            exception=None,
            context={},
        )
    events.request.fire(
        request_type=request_type,
        name=name,
        response_time=sample.duration_s * 1000,
        response_length=sample.completion_tokens or sample.tokens,
        exception=None,
        context={},
    )


def fire_failure(events, request_type: str, name: str, sample: RequestSample, exception: Exception) -> None:
    """The status in the name, so Locust's failure table groups failures by status code."""
    events.request.fire(
        request_type=request_type,
        name=f"{name} [{sample.status}]",
        response_time=sample.duration_s * 1000,
        response_length=sample.tokens,
        exception=exception,
        context={},
    )
