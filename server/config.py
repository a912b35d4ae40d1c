"""Everything the command line can set, in one frozen object: each field is its flag.

A field made with ``option(...)`` (engines/options.py, the mechanism engine options use) has
its one default, its ``--help`` text, its group there and the range the command line holds it
to; server/cli.py builds the parser from these fields.  Fields are in the flag's own unit
(``max_receive_mb``), and what the server needs in other units is a property beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engines.options import option

HTTP = "HTTP front end (with --http-port)"
SECURITY = "security"


@dataclass(frozen=True)
class ServerConfig:
    engine: str = option("hf-kv", "backend")  # its choices are the registry's, added by the command line
    model: str = option("smollm2-135m", "a built-in model or a path to a local Hugging Face causal-LM folder")
    host: str = option("0.0.0.0", "gRPC bind address")
    port: int = option(50051, "gRPC port; 0 picks a free one", minimum=0, maximum=65535)
    http_port: int | None = option(
        None,
        "serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health) "
        "on this port, same host, same engine; 0 picks a free one (default: off)",
        minimum=0,
        maximum=65535,
    )
    metrics_host: str = option("127.0.0.1", "bind address of /metrics: loopback only by default")
    metrics_port: int = option(9400, "Prometheus port; 0 picks a free one, -1 turns metrics off", minimum=-1)
    dtype: str = option(
        "auto",
        "weights dtype; auto is float32 on CPU, bfloat16 on CUDA",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    max_concurrency: int | None = option(
        None, "requests generated at once (default: 1 for hf-*, vLLM's max_num_seqs for vllm)", minimum=1
    )
    max_queue: int = option(64, "requests that may wait for a slot; beyond it RESOURCE_EXHAUSTED", minimum=0)
    # Which engines may is the registry's to say (added by the command line).
    engine_process: bool = option(
        False,
        "run the engine (its model, its loop and Score) in a child process of the server, so that its loop "
        "shares no GIL with the front ends (vLLM's EngineCore shape)",
    )
    max_queue_wait_s: float | None = option(
        None,
        "seconds a request may be expected to wait for a slot (estimated from the queue and the measured "
        "service time); beyond it RESOURCE_EXHAUSTED (HTTP 429) at once with a retry hint (default: off)",
        flag="max-queue-wait",
        positive=True,
    )
    grace_period_s: float = option(
        30.0, "seconds in-flight requests get to finish on SIGTERM", flag="grace-period", minimum=0
    )
    # What one caller can make the server hold (docs/operations.md, "Limits and failure behaviour"): a prompt
    # that fits any model here is far below 1 MiB; 64 streams per connection cover the load tests.
    max_receive_mb: float = option(1.0, "largest request accepted, in MiB", positive=True)
    max_concurrent_streams: int = option(64, "calls one client connection may have open at once", minimum=1)
    max_concurrent_rpcs: int = option(
        256, "calls open on the whole server, health included; past it RESOURCE_EXHAUSTED", minimum=2
    )
    stream_stall_timeout_s: float = option(
        20.0,
        "seconds a stream may wait on a client that reads nothing before it is cancelled and its slot freed",
        flag="stream-stall-timeout",
        positive=True,
    )
    expose_model_path: bool = option(False, "GetModelInfo includes the model's path on the server's disk")
    device_sample_period_s: float = option(
        1.0, "seconds between device memory/utilisation/power readings", flag="device-sample-period", positive=True
    )
    # The HTTP front end's bounds on a connection before it is a request (server/http/limits.py).
    http_read_timeout_s: float = option(
        10.0,
        "seconds a connection gets to send a request's line and headers, and then its body; past it 408 and the "
        "connection closes",
        flag="http-read-timeout",
        group=HTTP,
        positive=True,
    )
    http_max_header_kb: int = option(
        32, "largest request line plus headers, in KiB; past it 431", group=HTTP, minimum=1
    )
    http_max_connections: int = option(
        1024,
        "HTTP connections open at once, apart from requests in flight (--max-concurrent-rpcs): at the cap a new "
        "connection closes the oldest idle one, or gets 503 if none is idle",
        group=HTTP,
        minimum=1,
    )
    chat_template: str | None = option(
        None,
        "a Jinja chat template file (as vLLM and transformers serve take it) for chat prompts: gives a model "
        "that has none its template, or replaces the model's own",
    )
    memory_budget: int | None = option(
        None,
        "bytes the model (weights at --dtype plus the KV cache its engine reserves) may take; a model that needs "
        "more is refused before loading (default: the RAM available, or the CUDA device's free memory)",
        minimum=1,
    )
    skip_memory_check: bool = option(False, "load the model even when it seems not to fit the memory free")
    trust_remote_code: bool = option(
        False,
        "load a model folder that names classes of its own (auto_map in config.json or tokenizer_config.json): "
        "its Python files run in the server with the server's rights; without this flag such a folder is refused",
        group=SECURITY,
    )
    tls_cert: str | None = option(
        None, "PEM server certificate (chain): serve TLS instead of plaintext", group=SECURITY
    )
    tls_key: str | None = option(None, "PEM private key of --tls-cert", group=SECURITY)
    tls_client_ca: str | None = option(
        None, "PEM CA: clients must present a certificate it signed (mutual TLS)", group=SECURITY
    )
    # Not flags: the token is read from --auth-token-file, the rest is built by the command line.
    max_health_watchers: int = 64  # Health.Watch streams at once: probes use Check, so few are needed
    auth_token: str | None = field(default=None, repr=False)  # a secret: kept out of any printed config
    engine_options: object | None = None  # the engine's own Options instance (engines/options.py); None: defaults
    test_faults: tuple = ()  # engines/faults.py; only with --allow-test-faults

    @property
    def max_receive_bytes(self) -> int:
        return int(self.max_receive_mb * 2**20)

    @property
    def http_max_header_bytes(self) -> int:
        return self.http_max_header_kb * 1024

    @property
    def metrics_enabled(self) -> bool:
        return self.metrics_port >= 0
