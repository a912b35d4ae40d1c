"""Every metric, read back through loadtest/measure/scrape.py (the tools' own parser) after real requests."""

from __future__ import annotations

import time

import grpc
import psutil
import pytest

from loadtest.launch.server_process import ServerProcess
from loadtest.measure import scrape
from server.device_sampler import RaplReader
from server.grpc.wire import pb


def samples(server: ServerProcess) -> scrape.Samples:
    return scrape.read(server.metrics_port)


def value(all_samples: scrape.Samples, name: str, **labels) -> float:
    """Sum of the matching series; 0 before a labelled counter's first increment."""
    return scrape.total(all_samples, name, **labels) or 0.0


def series(all_samples: scrape.Samples, name: str) -> list[tuple[dict, float]]:
    """Each series of one metric: its labels and its value."""
    return [(dict(labels), v) for (metric, labels), v in all_samples.items() if metric == name]


@pytest.fixture(scope="module")
def fresh_server():
    server = ServerProcess("--engine", "hf-kv", "--model", "tiny-llama", "--device-sample-period", "0.2").wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def traffic(fresh_server):
    """A known mix: unary and streaming successes, and bad requests. Returns what the client saw."""
    seen = {"ok": 0, "bad": 0, "prompt_tokens": 0, "completion_tokens": 0, "ttft_s": 0.0, "itl": 0}
    for i, n in enumerate([5, 9, 17]):
        response = fresh_server.generate(f"unary prompt number {i}", max_new_tokens=n, ignore_eos=True)
        seen["ok"] += 1
        seen["prompt_tokens"] += response.usage.prompt_tokens
        seen["completion_tokens"] += response.usage.completion_tokens
        seen["ttft_s"] += response.ttft_ms / 1000
        seen["itl"] += response.usage.completion_tokens - 1
    for n in [4, 11]:
        chunks = list(fresh_server.stream("a streamed prompt", max_new_tokens=n, ignore_eos=True))
        seen["ok"] += 1
        seen["prompt_tokens"] += chunks[-1].usage.prompt_tokens
        seen["completion_tokens"] += sum(len(c.token_ids) for c in chunks)
        seen["itl"] += n - 1
    for bad in [dict(top_p=2.0), dict(max_new_tokens=0)]:
        with pytest.raises(grpc.RpcError):
            fresh_server.generate("bad", **bad)
        seen["bad"] += 1
    time.sleep(0.5)  # one device sample after the work
    return seen


def test_request_and_token_counters_equal_what_the_client_received(fresh_server, traffic):
    s = samples(fresh_server)
    labels = {"engine": "hf-kv", "model": "tiny-llama"}
    assert value(s, "yayi_requests_total", status="OK", **labels) == traffic["ok"]
    assert value(s, "yayi_requests_total", status="INVALID_ARGUMENT", **labels) == traffic["bad"]
    assert value(s, "yayi_generation_tokens_total", **labels) == traffic["completion_tokens"]
    assert value(s, "yayi_prompt_tokens_total", **labels) == traffic["prompt_tokens"]


def test_latency_histograms_count_each_request_and_gap(fresh_server, traffic):
    s = samples(fresh_server)
    assert value(s, "yayi_time_to_first_token_seconds_count") == traffic["ok"]
    assert value(s, "yayi_request_queue_seconds_count") == traffic["ok"]
    assert value(s, "yayi_inter_token_latency_seconds_count") == traffic["itl"]
    assert value(s, "yayi_request_duration_seconds_count") == traffic["ok"] + traffic["bad"]
    # The streamed requests' TTFT is in the histogram too, so its sum is at least the unary ones'.
    assert value(s, "yayi_time_to_first_token_seconds_sum") >= traffic["ttft_s"] * 0.999
    assert value(s, "yayi_inter_token_latency_seconds_sum") > 0


def test_gauges_at_rest_and_engine_info(fresh_server, traffic):
    s = samples(fresh_server)
    assert value(s, "yayi_requests_running") == 0 and value(s, "yayi_requests_waiting") == 0
    info = fresh_server.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=5)
    [(engine_info, _)] = series(s, "yayi_engine_info")
    assert engine_info["attention"] == info.attention
    assert engine_info["use_cache"] == "true" and engine_info["dtype"] == info.dtype


def test_cpu_device_series_match_the_process(fresh_server, traffic):
    s = samples(fresh_server)
    used = value(s, "yayi_device_memory_used_bytes", device="cpu")
    rss = psutil.Process(fresh_server.process.pid).memory_info().rss
    assert used == pytest.approx(rss, rel=0.2)
    assert value(s, "yayi_device_memory_peak_bytes", device="cpu") >= used
    utilization = [v for _, v in series(s, "yayi_device_utilization_ratio")]
    assert len(utilization) == 1 and 0.0 <= utilization[0] <= 1.0
    power_present = bool(series(s, "yayi_device_power_watts"))
    assert power_present == RaplReader().available, "power must be exported exactly when RAPL is readable"
    if not power_present:
        assert not series(s, "yayi_energy_joules_total"), "no energy without a power source"
        assert any("power and energy" in line for line in fresh_server.lines), "start-up log must say why"


def test_cancelled_request_is_counted(fresh_server, traffic):
    before = value(samples(fresh_server), "yayi_requests_total", status="CANCELLED")
    stream = fresh_server.stream("cancel me", max_new_tokens=800, ignore_eos=True)
    next(stream)
    stream.cancel()
    deadline = time.monotonic() + 5
    while (
        value(samples(fresh_server), "yayi_requests_total", status="CANCELLED") == before
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert value(samples(fresh_server), "yayi_requests_total", status="CANCELLED") == before + 1
