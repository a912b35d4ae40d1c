"""Everything the command line can set, in one frozen object."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerConfig:
    engine: str = "hf-kv"
    model: str = "smollm2-135m"
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9400  # None: no metrics endpoint
    http_port: int | None = None  # the OpenAI-compatible HTTP front end, on --host; None: off
    dtype: str = "auto"
    device: str = "auto"
    max_concurrency: int | None = None  # None: the engine's default (1 for hf-*, vLLM's own for vllm)
    max_queue: int = 64
    grace_period_s: float = 30.0
    # What one caller can make the server hold (docs/operations.md, "Limits and failure behaviour"): a prompt
    # that fits any model here is far below 1 MiB; 64 streams per connection cover the load tests.
    max_receive_bytes: int = 1024 * 1024
    max_concurrent_streams: int = 64  # per connection; more wait on the client's side
    max_concurrent_rpcs: int = 256  # server-wide; past it a call is refused with RESOURCE_EXHAUSTED at once
    max_health_watchers: int = 64  # Health.Watch streams at once: probes use Check, so few are needed
    stream_stall_timeout_s: float = 20.0  # a stream whose client reads nothing this long is cancelled
    # The HTTP front end's bounds on a connection before it is a request (server/http_limits.py).
    http_read_timeout_s: float = 10.0  # a request's head, and then its body, must each arrive in this time
    http_max_header_bytes: int = 32 * 1024  # request line and headers; more is a 431
    http_max_connections: int = 1024  # open at once; at the cap the oldest idle one is closed for a new one
    expose_model_path: bool = False  # GetModelInfo.model_path: the server's disk layout, only on request
    tls_cert: str | None = None  # PEM paths; cert and key together turn TLS on
    tls_key: str | None = None
    tls_client_ca: str | None = None  # mutual TLS: clients must present a certificate signed by this CA
    auth_token: str | None = field(default=None, repr=False)  # a secret: kept out of any printed config
    device_sample_period_s: float = 1.0
    engine_options: object | None = None  # the engine's own Options instance (engines/options.py); None: defaults
    test_faults: tuple = ()  # engines/faults.py; only with --allow-test-faults
