"""Everything the command line can set, in one frozen object."""

from __future__ import annotations

from dataclasses import dataclass


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
    max_concurrency: int = 1
    max_queue: int = 64
    grace_period_s: float = 30.0
    max_receive_bytes: int = 4 * 1024 * 1024
    device_sample_period_s: float = 1.0
