"""The capacity driver's settings, in one frozen object: each field is its flag (``option()``,
engines/options.py), declared once with its default and help."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from engines import option_flags, options
from engines.option_flags import flag_option
from engines.options import option
from loadtest.capacity.sweep import DEFAULT_SLO
from loadtest.compare.variants import Variant, by_label, check_flags, check_names, parse_variant

SEARCH = "the rate search"
PEERS = "targets and their servers"


@dataclass(frozen=True)
class CapacityConfig:
    engines: str = option(
        "hf-cb,vllm,llama-cpp",
        "our engines and --variant labels, comma-separated, each started as `make compare` starts it",
        group=PEERS,
    )
    variant: tuple[Variant, ...] = flag_option(
        (),
        "one string, repeatable: LABEL, which --engines may then name, is ENGINE plus these yayi-serve flags, "
        "searched like any target and set beside ENGINE in the ratio table, e.g. 'llama-cpp-t1=llama-cpp "
        "--threads 1' (python -m loadtest.capacity.tune makes them)",
        parse=parse_variant,
        repeat=True,
        metavar="LABEL=ENGINE [FLAGS...]",
        group=PEERS,
    )
    model: str = option("smollm2-135m", "built-in model name or local Hugging Face folder")
    apis: str = option("grpc", "front ends each engine is measured through: grpc, http or grpc,http", group=PEERS)
    baseline: str = option(
        "auto",
        "outside servers: vllm-openai, vllm-openai-matched, transformers-serve-matched, transformers-serve-defaults, "
        "llama-server, llama-server-defaults "
        "(comma-separated), none, or auto (each peer of a measured engine that is installed)",
        group=PEERS,
    )
    slo: str = option(DEFAULT_SLO, "the target: METRIC_pNN=BOUND terms, METRIC one of ttft, tpot, e2e")
    workload: str = option(
        "speed",
        "speed (the log's prompts), synthetic:in=uniform(64,256),out=fixed(128), file:PATH.jsonl or "
        "prefix:k=4,l=256,suffix=32 (loadtest/capacity/workloads.py)",
    )
    output_tokens: int = option(
        128, "tokens generated per request (exact: ignore_eos) unless the workload says", minimum=1
    )
    arrival: str = option("poisson", "arrival process", choices=("poisson", "constant", "gamma"))
    burstiness: float = option(1.0, "gamma arrivals' shape (vLLM's convention); 1 is Poisson", positive=True)
    seed: int = option(0, "the trace's seed: the same seed gives the same trace")
    step_seconds: float = option(20.0, "arrivals per step last about this long", group=SEARCH, positive=True)
    min_requests: int = option(12, "requests in a step at least, however low the rate", group=SEARCH, minimum=2)
    max_requests: int = option(400, "requests in a step at most (the trace's length)", group=SEARCH, minimum=2)
    start_rate: float = option(0.5, "first rate tried, requests/s", group=SEARCH, positive=True)
    factor: float = option(2.0, "the rate's step up before the first failure", group=SEARCH, minimum=1.01)
    max_rate: float = option(32.0, "highest rate tried, requests/s", group=SEARCH, positive=True)
    tolerance: float = option(0.2, "bisection stops when fail/pass is within 1 + this", group=SEARCH, positive=True)
    repeat: int = option(1, "rounds of every step, the targets interleaved at each rate", group=SEARCH, minimum=1)
    max_lag_s: float = option(
        0.25, "a step whose requests left this late at p99 is invalid", flag="max-lag", group=SEARCH, positive=True
    )
    request_timeout_s: float = option(
        120.0, "seconds a request may take before it is cut and counted", flag="request-timeout", positive=True
    )
    overload: float = option(
        2.0, "past capacity: each target also offered this times its capacity (0 skips it)", group=SEARCH, minimum=0
    )
    max_queue_wait_s: float = option(
        0.0,
        "our engines again past capacity with yayi-serve --max-queue-wait this many seconds (0: half the TTFT "
        "term, or 1 s; -1 skips these rows)",
        flag="max-queue-wait",
        group=SEARCH,
    )
    second_clock: str = option(
        "auto",
        "vllm bench serve replays each capacity point against our HTTP front end and the peers: auto (where vllm "
        "is installed), true or false",
        choices=("auto", "true", "false"),
    )
    dtype: str = option(
        "bfloat16", "hf engines', llama-cpp's and transformers serve's dtype (auto: each one's own)", group=PEERS
    )
    vllm_dtype: str = option("bfloat16", "our vllm engine's and vLLM's own server's dtype", group=PEERS)
    kv_cache_gb: float = option(1.0, "vLLM's CPU KV cache (both vLLM servers)", group=PEERS, positive=True)
    server_args: str = option("", "extra yayi-serve arguments for every engine, one string", group=PEERS)
    trust_remote_code: bool = option(
        False, "the model folder's own code runs: passed to every yayi-serve this run starts", group=PEERS
    )
    baseline_args: str = option("", "extra arguments for vLLM's own server, one string", group=PEERS)
    llama_server_args: str = option("", "extra arguments for llama-server, one string", group=PEERS)
    transformers_serve_args: str = option("", "extra arguments for transformers serve, one string", group=PEERS)
    sample_period_s: float = option(
        1.0, "seconds between device readings", flag="sample-period", group=PEERS, positive=True
    )
    start_timeout_s: float = option(
        900.0, "seconds a server may take to load", flag="start-timeout", group=PEERS, positive=True
    )
    out: str = option("", "report folder (default reports/capacity-<UTC time>)")

    def engine_names(self) -> list[str]:
        """--engines as a list: engines and variant labels."""
        return [name.strip() for name in self.engines.split(",") if name.strip()]


DESCRIPTION = (
    "Capacity at a latency target: open-loop arrivals from one seeded trace, a rate sweep to "
    "saturation for each engine and peer, goodput, and reports/capacity-<UTC time>/."
)


def build_parser() -> argparse.ArgumentParser:
    """The flags, made from the fields by the one flag builder the server and the other drivers use."""
    return option_flags.build_parser(CapacityConfig, "python -m loadtest.capacity", DESCRIPTION)


def parse(argv: list[str] | None = None) -> CapacityConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    for field in fields(CapacityConfig):
        why = options.out_of_range(CapacityConfig, field.name, getattr(args, field.name))
        if why is not None:
            parser.error(f"{options.flag(field.name, CapacityConfig)} {why}")
    config = CapacityConfig(**{**vars(args), "variant": tuple(args.variant)})
    if config.max_rate < config.start_rate:
        parser.error("--max-rate must be at least --start-rate")
    if config.max_requests < config.min_requests:
        parser.error("--max-requests must be at least --min-requests")
    try:
        variants = by_label(config.variant)
        check_names(config.engine_names(), variants)
        for variant in variants.values():
            check_flags(variant, config.model)
    except ValueError as exc:
        parser.error(str(exc))
    return config
