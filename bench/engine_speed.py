"""Single-request speed of each engine through the real gRPC server (``make bench``).

For each engine: start a server, warm it up, then send the inference log's three speed
prompts one at a time (greedy, ignore_eos, N new tokens) over streaming gRPC.  Prints
tokens/s (completion tokens over end-to-end time, the log's "Speed"), time to first
token, the server's peak resident memory, and each engine's speed as a ratio to
hf-eager, all from this one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

from loadtest.server_process import ServerProcess
from server.wire import pb

LOG_PROMPTS = [
    "Hey, are you conscious? Can you talk to me?",
    "I feel so bad today, what should I do?",
    "I've won an award today, I'm in a good mood",
]


def measure(server: ServerProcess, prompt: str, new_tokens: int) -> tuple[float, float, int]:
    started = time.perf_counter()
    first = None
    completion = 0
    for chunk in server.stream(prompt, timeout=3600, max_new_tokens=new_tokens, ignore_eos=True):
        if first is None and chunk.token_ids:
            first = time.perf_counter()
        if chunk.finish_reason:
            completion = chunk.usage.completion_tokens
    elapsed = time.perf_counter() - started
    return completion / elapsed, (first - started) * 1000, completion


def run_engine(engine: str, model: str, new_tokens: int, extra: list[str]) -> dict:
    server = ServerProcess("--engine", engine, "--model", model, "--metrics-port", "-1", *extra).wait_ready(900)
    try:
        info = server.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
        measure(server, "Warm-up", 8)
        runs = [measure(server, prompt, new_tokens) for prompt in LOG_PROMPTS]
        return {
            "engine": engine, "attention": info.attention, "use_cache": info.use_cache, "dtype": info.dtype,
            "device": info.device,
            "tokens_per_s": statistics.mean(r[0] for r in runs),
            "ttft_ms": statistics.mean(r[1] for r in runs),
            "tokens": sum(r[2] for r in runs),
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
        print(f"# {engine}: starting server, {len(LOG_PROMPTS)} prompts x {args.new_tokens} tokens ...", flush=True)
        rows.append(run_engine(engine, args.model, args.new_tokens, args.server_arg))
    baseline = next((r["tokens_per_s"] for r in rows if r["engine"] == "hf-eager"), None)
    print(f"\nmodel {args.model}, greedy, {args.new_tokens} new tokens, ignore_eos, one request at a time, "
          f"mean of the log's {len(LOG_PROMPTS)} prompts\n")
    print("| engine | use_cache | attention kernel | dtype | device | tokens/s | TTFT (ms) | peak RSS (MB) | vs hf-eager |")
    print("| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / baseline:.2f}x" if baseline else "n/a"
        print(f"| {r['engine']} | {r['use_cache']} | {r['attention']} | {r['dtype']} | {r['device']} | "
              f"{r['tokens_per_s']:.1f} | {r['ttft_ms']:.0f} | {r['peak_rss_mb']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
