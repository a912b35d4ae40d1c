"""One stream's decode speed with the model in one piece and in two pipeline stages, mp and Ray.

``python -m bench.vllm_parallel [--model smollm2-135m] [--dtype bfloat16] [--rounds 3]``.  Three
vllm servers are started side by side: PP 1; PP 2 as vLLM's worker processes (``mp``, threads
bound one core share per stage); PP 2 as actors on a two-node Ray cluster started here with Ray's
own ``ray start`` (one CPU per node, so one stage per node).  Each round sends each server the
same greedy request (the log's first prompt, ``--tokens`` new tokens, ignore_eos) one after the
other, A B C, A B C: the table shows each layout's median tokens/s with min-max, its time to first
token and start-up time, and its median ratio to PP 1 from per-round ratios.

On one small machine this is a functional proof, not a speed-up: the stages share the same cores
and pass activations through the loopback interface.  Pipeline stages pay off where a model does
not fit one device.
"""

from __future__ import annotations

import argparse
import statistics
import time

from loadtest.launch.ray_cluster import RayCluster
from loadtest.launch.server_process import ServerProcess
from loadtest.measure.prompts import LOG_SPEED_PROMPTS
from loadtest.measure.stream_clock import StreamClock
from loadtest.measure.tables import markdown_table
from server.grpc.wire import pb

LAYOUTS = {
    "PP 1": (),
    "PP 2, mp": ("--pipeline-parallel-size", "2"),
    "PP 2, ray (2 nodes)": ("--pipeline-parallel-size", "2", "--distributed-executor-backend", "ray"),
}


def one_stream(server: ServerProcess, tokens: int) -> tuple[float, float]:
    """tokens/s from the first token to the last (decode), and time to first token (s)."""
    clock = StreamClock()
    started = time.perf_counter()
    sample = clock.read(server.stream(LOG_SPEED_PROMPTS[0], timeout=600, max_new_tokens=tokens, ignore_eos=True))
    wall = time.perf_counter() - started
    count = sample.completion_tokens or sample.tokens
    ttft = sample.ttft_s or 0.0
    return (count - 1) / max(wall - ttft, 1e-9), ttft


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    cluster = RayCluster().start()
    servers: dict[str, ServerProcess] = {}
    started_s: dict[str, float] = {}
    try:
        for name, extra in LAYOUTS.items():
            began = time.perf_counter()
            env = {"RAY_ADDRESS": cluster.address} if "ray" in name else None
            servers[name] = ServerProcess(
                "--engine", "vllm", "--model", args.model, "--dtype", args.dtype, *extra, env=env
            ).wait_ready(900)
            started_s[name] = time.perf_counter() - began
            one_stream(servers[name], 8)  # warm
        speeds: dict[str, list[float]] = {name: [] for name in LAYOUTS}
        ttfts: dict[str, list[float]] = {name: [] for name in LAYOUTS}
        for _ in range(args.rounds):
            for name, server in servers.items():
                speed, ttft = one_stream(server, args.tokens)
                speeds[name].append(speed)
                ttfts[name].append(ttft)
        info = {name: s.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10) for name, s in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
        cluster.stop()

    rows = []
    for name in LAYOUTS:
        ratios = [s / base for s, base in zip(speeds[name], speeds["PP 1"])]
        rows.append(
            {
                "layout": name,
                "tokens/s (median)": round(statistics.median(speeds[name]), 1),
                "min-max": f"{min(speeds[name]):.1f}-{max(speeds[name]):.1f}",
                "x PP 1 (median of rounds)": round(statistics.median(ratios), 2),
                "TTFT ms (median)": round(1000 * statistics.median(ttfts[name])),
                "start-up s": round(started_s[name]),
            }
        )
    print(f"{args.model} {args.dtype}, one stream, {args.tokens} new tokens, {args.rounds} interleaved rounds")
    print(markdown_table(rows))
    for name, model_info in info.items():
        print(f"- {name}: {model_info.attention}")


if __name__ == "__main__":
    main()
