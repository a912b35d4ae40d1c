"""A Locust user that calls ``GenerateStream`` and measures each request itself.

Follows Locust's own gRPC example: grpc is made gevent-safe before any channel exists, and
the user fires ``events.request`` itself.  A streaming call needs more than one event: one
for the whole request (response_length = tokens) and one for the time to first token, so
both show in Locust's table, and a ``RequestSample`` with every inter-token gap for the
serving-benchmark summary (see token_stats).
"""

from __future__ import annotations

import time

import grpc
import grpc.experimental.gevent as grpc_gevent
from gevent import GreenletExit
from locust import User

from server.wire import pb, pb_grpc

from .token_stats import CUT, RequestSample

grpc_gevent.init_gevent()

REQUEST_TYPE = "grpc"
STREAM_NAME = "GenerateStream"
TTFT_NAME = "GenerateStream TTFT"


def grpc_target(host: str) -> str:
    """Locust insists on a --host; accept HOST:PORT or grpc://HOST:PORT."""
    for scheme in ("grpc://", "http://"):
        if host.startswith(scheme):
            return host[len(scheme):]
    return host


class StreamingGrpcUser(User):
    abstract = True

    def __init__(self, environment) -> None:
        super().__init__(environment)
        self.channel = grpc.insecure_channel(grpc_target(self.host or ""))
        self.stub = pb_grpc.InferenceStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    def generate_stream(self, request: pb.GenerateRequest, timeout: float | None = None) -> RequestSample:
        events = self.environment.events
        started_wall = time.time()
        started = last = time.perf_counter()
        sample = RequestSample(started=started_wall, duration_s=0.0, tokens=0)
        call = self.stub.GenerateStream(request, timeout=timeout)
        try:
            for chunk in call:
                now = time.perf_counter()
                count = len(chunk.token_ids)
                if count:
                    if sample.ttft_s is None:
                        sample.ttft_s = now - started
                    else:
                        # A chunk may carry several tokens (held back to finish a character or
                        # rule out a stop string): spread its gap over them, as vLLM's bench does.
                        sample.itl_s.extend([(now - last) / count] * count)
                    sample.tokens += count
                    last = now
                if chunk.HasField("usage"):
                    sample.completion_tokens = chunk.usage.completion_tokens
        except grpc.RpcError as error:
            sample.duration_s = time.perf_counter() - started
            sample.status = error.code().name
            events.request.fire(
                request_type=REQUEST_TYPE, name=f"{STREAM_NAME} [{sample.status}]",
                response_time=sample.duration_s * 1000, response_length=sample.tokens,
                exception=RuntimeError(f"{sample.status}: {error.details()}"), context={})
            self.record(sample)
            return sample
        except GreenletExit:
            # The load test is stopping: free the server's slot rather than leave it generating.
            call.cancel()
            sample.duration_s = time.perf_counter() - started
            sample.status = CUT
            self.record(sample)
            raise
        sample.duration_s = time.perf_counter() - started
        self.record(sample)
        if sample.ttft_s is not None:
            events.request.fire(request_type=REQUEST_TYPE, name=TTFT_NAME, response_time=sample.ttft_s * 1000,
                                response_length=0, exception=None, context={})
        events.request.fire(request_type=REQUEST_TYPE, name=STREAM_NAME, response_time=sample.duration_s * 1000,
                            response_length=sample.completion_tokens or sample.tokens, exception=None, context={})
        return sample

    def record(self, sample: RequestSample) -> None:
        """Where samples go: the locustfile's collector.  Subclasses override it."""
