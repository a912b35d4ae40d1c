"""vLLM feasibility: aggregate throughput against concurrency, vllm vs hf-kv, through the same gRPC server.

``make bench-vllm``.  For each engine a server is started; at each concurrency c, c
clients each send streaming requests (the inference log's prompts in turn, see
docs/design.md; greedy, N new tokens, ignore_eos) so that c requests are always in
flight, for ``--requests-per-client`` requests each.  Printed per row: aggregate tokens/s
(all completion tokens over the level's wall time), TTFT p50/p95 (loadtest's clock and percentile, as yayi-compare's).
Last, vLLM's own offline ``LLM.generate`` on the same 16 requests, in the same run, to
show what the gRPC layer costs.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

from loadtest.launch.server_process import ServerProcess
from loadtest.measure.prompts import LOG_SPEED_PROMPTS
from loadtest.measure.stream_clock import StreamClock
from loadtest.measure.tables import markdown_table
from loadtest.measure.token_stats import percentile


def run_level(server: ServerProcess, concurrency: int, per_client: int, new_tokens: int) -> dict:
    ttfts: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(index: int) -> None:
        for k in range(per_client):
            prompt = LOG_SPEED_PROMPTS[(index + k) % len(LOG_SPEED_PROMPTS)]
            clock = StreamClock()
            sample = clock.read(server.stream(prompt, timeout=3600, max_new_tokens=new_tokens, ignore_eos=True))
            with lock:
                tokens[0] += sample.completion_tokens or sample.tokens
                ttfts.append(sample.ttft_s * 1000)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "tokens_per_s": tokens[0] / wall,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p95": percentile(ttfts, 95),
        "requests": len(ttfts),
    }


def offline_vllm(model: str, requests: int, new_tokens: int, kv_cache_gb: float, dtype: str) -> float:
    """vLLM's own LLM.generate on the same requests: the bound our server should approach."""
    from vllm import LLM, SamplingParams

    from engines.models import resolve_model

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{kv_cache_gb:g}"
    llm = LLM(model=str(resolve_model(model)), dtype=dtype, max_model_len=2048, enforce_eager=True, seed=0)
    prompts = [LOG_SPEED_PROMPTS[i % len(LOG_SPEED_PROMPTS)] for i in range(requests)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=8))
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outputs) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--engines", default="vllm,hf-kv")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--kv-cache-gb", type=float, default=2.0)
    parser.add_argument(
        "--vllm-dtype", default="float32", help="vllm's dtype (hf-kv stays float32, its fast path here)"
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    for engine in args.engines.split(","):
        extra = (
            ["--kv-cache-gb", str(args.kv_cache_gb), "--max-concurrency", str(max(levels)), "--dtype", args.vllm_dtype]
            if engine == "vllm"
            else []
        )
        print(f"# {engine}: starting server", flush=True)
        server = ServerProcess("--engine", engine, "--model", args.model, "--metrics-port", "-1", *extra).wait_ready(
            900
        )
        try:
            server.generate("warm up", max_new_tokens=8, timeout=600)
            for concurrency in levels:
                print(f"# {engine}: concurrency {concurrency}", flush=True)
                rows.append(
                    {
                        "engine": engine,
                        "concurrency": concurrency,
                        **run_level(server, concurrency, args.requests_per_client, args.new_tokens),
                    }
                )
        finally:
            server.stop()
    offline_requests = max(levels)
    print(f"# vLLM offline LLM.generate, {offline_requests} requests", flush=True)
    offline = offline_vllm(args.model, offline_requests, args.new_tokens, args.kv_cache_gb, args.vllm_dtype)
    print(
        f"\nmodel {args.model}, vllm {args.vllm_dtype}, hf-kv float32, CPU, greedy, "
        f"{args.new_tokens} new tokens, ignore_eos, "
        f"{args.requests_per_client} request(s) per client, through gRPC streaming\n"
    )
    offline_row = {
        "engine": "vLLM offline LLM.generate",
        "concurrency": f"{offline_requests} (one batch)",
        "tokens_per_s": offline,
        "requests": offline_requests,
    }
    print(
        markdown_table(
            rows + [offline_row],
            ["engine", "concurrency", "tokens_per_s", "ttft_p50", "ttft_p95", "requests"],
            {"tokens_per_s": "aggregate tokens/s", "ttft_p50": "TTFT p50 (ms)", "ttft_p95": "TTFT p95 (ms)"},
        )
    )
    by = {(r["engine"], r["concurrency"]): r["tokens_per_s"] for r in rows}
    top = max(levels)
    if ("vllm", top) in by and ("hf-kv", top) in by:
        print(f"\nvllm / hf-kv at concurrency {top}: {by[('vllm', top)] / by[('hf-kv', top)]:.1f}x")
    if ("vllm", top) in by:
        print(f"vllm through gRPC / vLLM offline at {top}: {by[('vllm', top)] / offline:.2f}")


if __name__ == "__main__":
    main()
