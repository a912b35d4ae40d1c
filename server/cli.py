"""The ``yayi-serve`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from engines.registry import EngineNotInstalled, UnknownEngine, engine_names
from engines.errors import EngineError
from engines.models import ModelNotFound, builtin_models

from .app import StartupError, serve
from .config import ServerConfig

DEFAULTS = ServerConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yayi-serve", description="gRPC inference server for causal language models with pluggable engines.")
    parser.add_argument("--engine", default=DEFAULTS.engine, choices=engine_names(),
                        help="backend (default %(default)s)")
    parser.add_argument("--model", default=DEFAULTS.model,
                        help=f"a built-in model ({', '.join(builtin_models())}) or a path to a local "
                             "Hugging Face causal-LM folder (default %(default)s)")
    parser.add_argument("--host", default=DEFAULTS.host, help="gRPC bind address (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULTS.port, help="gRPC port; 0 picks a free one")
    parser.add_argument("--metrics-host", default=DEFAULTS.metrics_host,
                        help="bind address of /metrics (default %(default)s: loopback only)")
    parser.add_argument("--metrics-port", type=int, default=DEFAULTS.metrics_port,
                        help="Prometheus port; 0 picks a free one, -1 turns metrics off (default %(default)s)")
    parser.add_argument("--dtype", default=DEFAULTS.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights dtype; auto is float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--device", default=DEFAULTS.device, help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--max-concurrency", type=int, default=DEFAULTS.max_concurrency,
                        help="requests generated at once (default: 1 for hf-*, vLLM's max_num_seqs for vllm)")
    parser.add_argument("--max-queue", type=int, default=DEFAULTS.max_queue,
                        help="requests that may wait for a slot; beyond it RESOURCE_EXHAUSTED (default %(default)s)")
    parser.add_argument("--grace-period", type=float, default=DEFAULTS.grace_period_s,
                        help="seconds in-flight requests get to finish on SIGTERM (default %(default)s)")
    parser.add_argument("--max-receive-mb", type=float, default=DEFAULTS.max_receive_bytes / 2**20,
                        help="largest request accepted, in MiB (default %(default)g)")
    parser.add_argument("--device-sample-period", type=float, default=DEFAULTS.device_sample_period_s,
                        help="seconds between device memory/utilisation/power readings (default %(default)s)")
    vllm = parser.add_argument_group("vllm engine")
    vllm.add_argument("--max-model-len", type=int, help="context length vLLM serves (default 2048)")
    vllm.add_argument("--kv-cache-gb", type=float, help="CPU: KV-cache space in GiB (VLLM_CPU_KVCACHE_SPACE, default 1)")
    vllm.add_argument("--gpu-memory-utilization", type=float, help="CUDA: share of GPU memory vLLM may take (default 0.9)")
    vllm.add_argument("--enforce-eager", choices=["auto", "true", "false"], default="auto",
                      help="skip torch.compile and CUDA graphs (auto: true on CPU, false on CUDA)")
    vllm.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per model replica (vLLM)")
    vllm.add_argument("--pipeline-parallel-size", type=int, default=1,
                      help="pipeline stages, across nodes with Ray (vLLM)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise SystemExit("yayi-serve: error: --max-concurrency must be at least 1")
    if args.max_queue < 0:
        raise SystemExit("yayi-serve: error: --max-queue must be 0 or more")
    return ServerConfig(
        engine=args.engine, model=args.model, host=args.host, port=args.port, metrics_host=args.metrics_host,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port, dtype=args.dtype, device=args.device,
        max_concurrency=args.max_concurrency, max_queue=args.max_queue, grace_period_s=args.grace_period,
        max_receive_bytes=int(args.max_receive_mb * 2**20), device_sample_period_s=args.device_sample_period,
        max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager={"auto": None, "true": True, "false": False}[args.enforce_eager],
        tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    try:
        return asyncio.run(serve(config, announce=lambda line: print(line, flush=True)))
    except (StartupError, EngineNotInstalled, UnknownEngine, ModelNotFound, EngineError, OSError) as exc:
        print(f"yayi-serve: error: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
