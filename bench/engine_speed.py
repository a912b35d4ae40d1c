"""Single-request speed of each engine through the real gRPC server (``make bench``).

For each engine: start a server, warm it up, then send the inference log's three speed
prompts (docs/design.md) one at a time (greedy, ignore_eos, N new tokens) over streaming
gRPC.  Prints tokens/s (completion tokens over end-to-end time, the log's "Speed"), time
to first token, the server's peak resident memory, and each engine's speed as a ratio to
hf-eager, all from this one run.
"""

from __future__ import annotations

import argparse
import statistics

from loadtest.launch.server_process import ServerProcess
from loadtest.measure.prompts import LOG_SPEED_PROMPTS
from loadtest.measure.stream_clock import StreamClock
from loadtest.measure.tables import markdown_table
from loadtest.measure.token_stats import RequestSample
from server.grpc.wire import pb


def measure(server: ServerProcess, prompt: str, new_tokens: int) -> RequestSample:
    """One streamed request, timed by the load test's own clock."""
    clock = StreamClock()
    return clock.read(server.stream(prompt, timeout=3600, max_new_tokens=new_tokens, ignore_eos=True))


def speed(sample: RequestSample) -> float:
    """The log's "Speed": the server's completion tokens over the whole request."""
    return (sample.completion_tokens or sample.tokens) / sample.duration_s


def run_engine(engine: str, model: str, new_tokens: int, extra: list[str]) -> dict:
    server = ServerProcess("--engine", engine, "--model", model, "--metrics-port", "-1", *extra).wait_ready(900)
    try:
        info = server.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
        measure(server, "Warm-up", 8)
        runs = [measure(server, prompt, new_tokens) for prompt in LOG_SPEED_PROMPTS]
        return {
            "engine": engine,
            "attention": info.attention,
            "use_cache": info.use_cache,
            "dtype": info.dtype,
            "device": info.device,
            "tokens_per_s": statistics.mean(speed(r) for r in runs),
            "ttft_ms": statistics.mean(r.ttft_s * 1000 for r in runs),
            "tokens": sum(r.completion_tokens or r.tokens for r in runs),
            "peak_rss_mb": server.peak_rss_bytes() / 2**20,
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--engines", default="hf-eager,hf-kv,hf-flash")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--server-arg", action="append", default=[], help="extra yayi-serve argument (repeatable)")
    args = parser.parse_args()
    rows = []
    for engine in args.engines.split(","):
        print(
            f"# {engine}: starting server, {len(LOG_SPEED_PROMPTS)} prompts x {args.new_tokens} tokens ...", flush=True
        )
        rows.append(run_engine(engine, args.model, args.new_tokens, args.server_arg))
    baseline = next((r["tokens_per_s"] for r in rows if r["engine"] == "hf-eager"), None)
    print(
        f"\nmodel {args.model}, greedy, {args.new_tokens} new tokens, ignore_eos, one request at a time, "
        f"mean of the log's {len(LOG_SPEED_PROMPTS)} prompts\n"
    )
    for r in rows:
        r["vs_eager"] = f"{r['tokens_per_s'] / baseline:.2f}x" if baseline else "n/a"
    print(
        markdown_table(
            rows,
            [
                "engine",
                "use_cache",
                "attention",
                "dtype",
                "device",
                "tokens_per_s",
                "ttft_ms",
                "peak_rss_mb",
                "vs_eager",
            ],
            {
                "attention": "attention kernel",
                "tokens_per_s": "tokens/s",
                "ttft_ms": "TTFT (ms)",
                "peak_rss_mb": "peak RSS (MB)",
                "vs_eager": "vs hf-eager",
            },
        )
    )


if __name__ == "__main__":
    main()
