"""What tests read from a running server: a /metrics series, waiting for a condition, work that stops,
a stream's raw bytes."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2

from loadtest.launch.server_process import ServerProcess
from loadtest.measure import scrape
from server.grpc.wire import SERVICE_NAME, pb


def metric(server: ServerProcess, name: str, **labels) -> float:
    """Sum of the matching series; 0 before a labelled counter's first increment."""
    return (
        scrape.total(scrape.parse(scrape.fetch(f"http://127.0.0.1:{server.metrics_port}/metrics")), name, **labels)
        or 0.0
    )


def wait_until(condition, timeout: float = 5.0) -> bool:
    """Polls ``condition`` until it holds or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def idle(server: ServerProcess) -> bool:
    return metric(server, "yayi_requests_running") + metric(server, "yayi_requests_waiting") == 0


def assert_deadline_stops_the_work(server: ServerProcess) -> None:
    """A call whose deadline passes mid-generation fails so, and no token is generated after it."""
    with pytest.raises(grpc.RpcError) as error:
        server.generate("slow", max_new_tokens=900, ignore_eos=True, timeout=0.3)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: metric(server, "yayi_requests_running") == 0)
    tokens = metric(server, "yayi_generation_tokens_total")
    time.sleep(0.5)
    assert metric(server, "yayi_generation_tokens_total") == tokens, "work went on past the deadline"


def raw_stream(server: ServerProcess, message: pb.GenerateRequest, timeout: float = 60):
    """The stream's chunks as the bytes on the wire, before any client-side decoding."""
    call = server.channel.unary_stream(
        f"/{SERVICE_NAME}/GenerateStream", request_serializer=pb.GenerateRequest.SerializeToString
    )
    return list(call(message, timeout=timeout))


def http_health(server: ServerProcess) -> int:
    try:
        with urllib.request.urlopen(f"{server.http_url}/health", timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def dies_under_load(server: ServerProcess, kill, within_s: float) -> None:
    """Kills an engine's process (``kill()``) while a stream is in flight: UNAVAILABLE within ``within_s``,
    then NOT_SERVING on both health services and on HTTP, and new calls refused."""
    stream = server.stream("keep going", max_new_tokens=900, ignore_eos=True, timeout=120)
    next(stream), next(stream)
    killed_at = time.monotonic()
    kill()
    with pytest.raises(grpc.RpcError) as failed:
        for _ in stream:
            pass
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
    assert time.monotonic() - killed_at < within_s
    assert "restart the server" in failed.value.details()
    assert server.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING
    assert server.health_status("yayi.serving.v1.Inference") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert http_health(server) == 503
    with pytest.raises(grpc.RpcError) as refused:
        server.generate("anyone?", max_new_tokens=2, timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
