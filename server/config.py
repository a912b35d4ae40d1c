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
    dtype: str = "auto"
    device: str = "auto"
    max_concurrency: int | None = None  # None: the engine's default (1 for hf-*, vLLM's own for vllm)
    max_queue: int = 64
    grace_period_s: float = 30.0
    max_receive_bytes: int = 4 * 1024 * 1024
    max_concurrent_streams: int = 256  # per connection: far above any load test here, bounds one greedy client
    tls_cert: str | None = None  # PEM paths; cert and key together turn TLS on
    tls_key: str | None = None
    tls_client_ca: str | None = None  # mutual TLS: clients must present a certificate signed by this CA
    auth_token: str | None = field(default=None, repr=False)  # a secret: kept out of any printed config
    device_sample_period_s: float = 1.0
    engine_options: object | None = None  # the engine's own Options instance (engines/options.py); None: defaults
    test_faults: tuple = ()  # engines/faults.py; only with --allow-test-faults
