"""Every Prometheus metric the server exports is defined here, and only here.

Engines report plain facts (tokens, timestamps, load); this module turns them into
series with the ``engine`` and ``model`` labels that dashboards group by.  Per-request
timing is recorded in the streaming loop through a ``RequestRecorder``, so unary and
streaming calls are measured the same way and time to first token is real.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from engines.base import EngineInfo, EngineLoad
from server.device_sampler import DeviceReading
from server.metrics_http import MetricsHTTPServer

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_QUEUE_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60)


class ServerMetrics:
    def __init__(self, engine: str, model: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.labels = {"engine": engine, "model": model}
        self._children: dict[object, object] = {}
        base = ["engine", "model"]
        device = [*base, "device"]

        def metric(kind, name: str, documentation: str, labels: list[str] = base, **options):
            # Every series carries the server's labels and lives in this server's registry.
            return kind(name, documentation, labels, registry=self.registry, **options)

        self._requests = metric(
            Counter,
            "yayi_requests",
            "Finished requests by gRPC status, method and front end (api)",
            [*base, "status", "method", "api"],
        )
        self._stalls = metric(Counter, "yayi_stream_stalls", "Streams cancelled because the client stopped reading")
        self._http_closed = metric(
            Counter,
            "yayi_http_connections_closed",
            "HTTP connections the server closed before they made a request, by reason (server/http/limits.py)",
            [*base, "reason"],
        )
        self._prompt_tokens = metric(Counter, "yayi_prompt_tokens", "Prompt tokens processed")
        self._generation_tokens = metric(Counter, "yayi_generation_tokens", "Tokens generated")
        self._ttft = metric(
            Histogram, "yayi_time_to_first_token_seconds", "Request arrival to first token", buckets=_TTFT_BUCKETS
        )
        self._itl = metric(
            Histogram, "yayi_inter_token_latency_seconds", "Gap between successive tokens", buckets=_ITL_BUCKETS
        )
        self._duration = metric(
            Histogram, "yayi_request_duration_seconds", "Request arrival to last token", buckets=_DURATION_BUCKETS
        )
        self._queue = metric(
            Histogram, "yayi_request_queue_seconds", "Request arrival to start of work", buckets=_QUEUE_BUCKETS
        )
        self._running = metric(Gauge, "yayi_requests_running", "Requests being generated now")
        self._waiting = metric(Gauge, "yayi_requests_waiting", "Requests waiting for a slot now")
        self._kv_cache_usage = metric(
            Gauge, "yayi_kv_cache_usage_ratio", "0..1: KV-cache blocks in use over blocks (engines with a paged cache)"
        )
        self._engine_info = metric(Info, "yayi_engine", "What is really running")
        self._memory_used = metric(
            Gauge,
            "yayi_device_memory_used_bytes",
            "GPU memory in use (NVML), or on CPU the server's resident memory",
            device,
        )
        self._memory_peak = metric(
            Gauge, "yayi_device_memory_peak_bytes", "Peak of yayi_device_memory_used_bytes since start", device
        )
        self._utilization = metric(
            Gauge,
            "yayi_device_utilization_ratio",
            "0..1: GPU busy (NVML), or the server's CPU share of the machine",
            device,
        )
        self._power = metric(
            Gauge, "yayi_device_power_watts", "Device power (NVML, or CPU package power from RAPL)", device
        )
        self._energy = metric(Counter, "yayi_energy_joules", "Device energy used since start", device)
        self._torch_allocated = metric(
            Gauge, "yayi_torch_memory_allocated_bytes", "torch's CUDA allocator: allocated now", device
        )
        self._torch_peak = metric(
            Gauge, "yayi_torch_memory_peak_allocated_bytes", "torch's CUDA allocator: peak allocated", device
        )
        self._peak_seen: dict[str, float] = {}
        self._http: MetricsHTTPServer | None = None

    def child(self, metric):
        """``metric`` with this server's labels, looked up once: the per-token path reads it for every
        token, and prometheus_client's labels() costs more than the update itself."""
        found = self._children.get(metric)
        if found is None:
            found = self._children[metric] = metric.labels(**self.labels)
        return found

    def watch_load(self, load: Callable[[], EngineLoad]) -> None:
        # Read at scrape time, so the gauges are never stale and cost nothing between scrapes.
        self._running.labels(**self.labels).set_function(lambda: load().running)
        self._waiting.labels(**self.labels).set_function(lambda: load().waiting)
        # Only engines with a paged cache report usage; for the others the series stays absent, not 0.
        if load().kv_cache_usage is not None:
            self._kv_cache_usage.labels(**self.labels).set_function(lambda: load().kv_cache_usage or 0.0)

    def set_engine_info(self, info: EngineInfo) -> None:
        self._engine_info.labels(**self.labels).info(
            {
                "dtype": info.dtype,
                "device": info.device,
                "attention": info.attention,
                "use_cache": str(info.use_cache).lower(),
                # The model folder's own Python files that ran (--trust-remote-code); "none" when none did.
                "custom_code": ",".join(info.custom_code) or "none",
            }
        )

    def record_device(self, reading: DeviceReading) -> None:
        """Sets the device series; a figure that is None stays absent rather than reading 0."""
        labels = {**self.labels, "device": reading.device}
        if reading.memory_used_bytes is not None:
            self._memory_used.labels(**labels).set(reading.memory_used_bytes)
            peak = max(self._peak_seen.get(reading.device, 0.0), reading.memory_used_bytes)
            self._peak_seen[reading.device] = peak
            self._memory_peak.labels(**labels).set(peak)
        for gauge, value in (
            (self._utilization, reading.utilization_ratio),
            (self._power, reading.power_watts),
            (self._torch_allocated, reading.torch_allocated_bytes),
            (self._torch_peak, reading.torch_peak_allocated_bytes),
        ):
            if value is not None:
                gauge.labels(**labels).set(value)
        if reading.energy_joules is not None:
            self._energy.labels(**labels).inc(max(0.0, reading.energy_joules))

    def recorder(self, method: str, api: str = "grpc", generates: bool = True) -> RequestRecorder:
        """``generates=False`` (Score, GetModelInfo): counted, but kept out of the token-timing histograms."""
        return RequestRecorder(self, method, api, generates)

    def count_request(self, status: str, method: str, api: str = "grpc") -> None:
        self._requests.labels(**self.labels, status=status, method=method, api=api).inc()

    def count_http_close(self, reason: str) -> None:
        self._http_closed.labels(**self.labels, reason=reason).inc()

    def count_stall(self) -> None:
        self._stalls.labels(**self.labels).inc()

    def serve(self, host: str, port: int) -> int:
        self._http = MetricsHTTPServer(self.registry, host, port)
        return self._http.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.stop()


class RequestRecorder:
    """Timing of one request, fed from the streaming loop as outputs arrive."""

    def __init__(self, metrics: ServerMetrics, method: str, api: str, generates: bool = True) -> None:
        self._m = metrics
        self._method = method
        self._api = api
        self._generates = generates
        self.arrived = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._prompt_counted = False

    def on_output(self, started_at: float | None, prompt_tokens: int, new_tokens: int) -> None:
        now = time.monotonic()
        child = self._m.child
        if started_at is not None:
            child(self._m._queue).observe(max(0.0, started_at - self.arrived))
        if not self._prompt_counted:
            child(self._m._prompt_tokens).inc(prompt_tokens)
            self._prompt_counted = True
        if new_tokens == 0:
            return
        child(self._m._generation_tokens).inc(new_tokens)
        if self.first_token_at is None:
            self.first_token_at = now
            child(self._m._ttft).observe(now - self.arrived)
        else:
            # Several tokens in one output (batched engines) share the gap evenly.
            gap = (now - (self.last_token_at or now)) / new_tokens
            itl = child(self._m._itl)
            for _ in range(new_tokens):
                itl.observe(gap)
        self.last_token_at = now

    def finish(self, status: str) -> None:
        if self._generates:
            end = self.last_token_at or time.monotonic()
            self._m._duration.labels(**self._m.labels).observe(end - self.arrived)
        self._m.count_request(status, self._method, self._api)

    @property
    def ttft_ms(self) -> float:
        return 0.0 if self.first_token_at is None else (self.first_token_at - self.arrived) * 1000

    @property
    def e2e_ms(self) -> float:
        return ((self.last_token_at or time.monotonic()) - self.arrived) * 1000
