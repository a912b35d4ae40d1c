"""A Locust user that calls ``GenerateStream`` and measures each request itself.

Follows Locust's own gRPC example: grpc is made gevent-safe before any channel exists, and
the user fires ``events.request`` itself.  A streaming call needs more than one event: one
for the whole request (response_length = tokens) and one for the time to first token, so
both show in Locust's table, and a ``RequestSample`` with every inter-token gap for the
serving-benchmark summary (see token_stats).
"""

from __future__ import annotations

import itertools

import grpc
import grpc.experimental.gevent as grpc_gevent
from gevent import GreenletExit
from locust import User

from loadtest.measure.stream_clock import StreamClock, fire_failure, fire_success
from loadtest.measure.token_stats import CUT, RequestSample
from server.grpc.wire import pb, pb_grpc

grpc_gevent.init_gevent()

REQUEST_TYPE = "grpc"
STREAM_NAME = "GenerateStream"


def grpc_target(host: str) -> str:
    """Locust insists on a --host; accept HOST:PORT or grpc://HOST:PORT."""
    for scheme in ("grpc://", "http://"):
        if host.startswith(scheme):
            return host[len(scheme) :]
    return host


_channels: dict[tuple[str, int], grpc.Channel] = {}
_user_numbers = itertools.count()


def _shared_channel(target: str, index: int = 0) -> grpc.Channel:
    """One HTTP/2 connection per Locust process, multiplexing every user's streams.

    With a channel per user, grpc's gevent mode stalled here: sixteen users streaming from a
    server that runs one request at a time received no token at all for a whole minute while
    the server generated hundreds (tests/integration/test_loadtest.py keeps that case).  One channel is
    also what a real client does.
    """
    if (target, index) not in _channels:
        # Distinct options make distinct connections; equal ones would share a subchannel.
        _channels[target, index] = grpc.insecure_channel(target, options=[("yayi.channel_index", index)])
    return _channels[target, index]


class StreamingGrpcUser(User):
    abstract = True

    def __init__(self, environment) -> None:
        super().__init__(environment)
        options = environment.parsed_options
        channels = max(1, getattr(options, "grpc_channels", 1) or 1) if options else 1
        self.stub = pb_grpc.InferenceStub(_shared_channel(grpc_target(self.host or ""), next(_user_numbers) % channels))

    def generate_stream(self, request: pb.GenerateRequest, timeout: float | None = None) -> RequestSample:
        clock = StreamClock()
        call = self.stub.GenerateStream(request, timeout=timeout)
        try:
            for chunk in call:
                clock.chunk(chunk)
        except grpc.RpcError as error:
            sample = clock.finish(error.code().name)
            fire_failure(
                self.environment.events,
                REQUEST_TYPE,
                STREAM_NAME,
                sample,
                RuntimeError(f"{sample.status}: {error.details()}"),
            )
            self.record(sample)
            return sample
        except GreenletExit:
            # The load test is stopping: free the server's slot rather than leave it generating.
            call.cancel()
            self.record(clock.finish(CUT))
            raise
        sample = clock.finish()
        self.record(sample)
        fire_success(self.environment.events, REQUEST_TYPE, STREAM_NAME, sample)
        return sample

    def record(self, sample: RequestSample) -> None:
        """Where samples go: the locustfile's collector.  Subclasses override it."""
