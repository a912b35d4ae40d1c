"""The llama-cpp engine served against llama.cpp's own llama-server, same GGUF, same threads.

Both are driven over their OpenAI ``/v1/completions`` streams by the same client, greedy,
``ignore_eos``, 128 new tokens, the log's three prompts, at each concurrency, in interleaved
rounds (ours, theirs, ours, theirs, ...), so a noisy machine moves both sides alike.  Prints
tokens/s and TTFT p50 per side and the per-round ratio's median and range.

    .venv/bin/python -m bench.llama_cpp_speed [--dtype bfloat16|auto] [--users 1,4,16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from engines.llama_cpp.gguf import llama_server_binary, resolve_gguf
from loadtest.launch.server_process import ServerProcess
from loadtest.measure.prompts import LOG_SPEED_PROMPTS

TOKENS = 128


async def _one(client: httpx.AsyncClient, url: str, prompt: str, model: str) -> tuple[int, float]:
    body = {"model": model, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "stream": True}
    body["ignore_eos"] = True
    began = time.monotonic()
    ttft = None
    tokens = 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                tokens += 1
                ttft = ttft if ttft is not None else time.monotonic() - began
    return tokens, ttft or 0.0


async def _step(url: str, users: int, model: str) -> tuple[float, float]:
    """tokens/s over the step and TTFT p50: ``users`` streams, each running 2 requests back to back."""
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        began = time.monotonic()

        async def user(i):
            return [await _one(client, url, LOG_SPEED_PROMPTS[(i + k) % 3], model) for k in range(2)]

        results = [r for rs in await asyncio.gather(*(user(i) for i in range(users))) for r in rs]
        elapsed = time.monotonic() - began
    # Streams count chunks with text; usage would be exact, but both sides are counted alike.
    return sum(t for t, _ in results) / elapsed, statistics.median(t for _, t in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--users", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--parallel", type=int, default=16)
    args = parser.parse_args()
    users = [int(u) for u in args.users.split(",")]
    gguf = resolve_gguf(args.model, args.dtype)
    folder = Path(tempfile.mkdtemp(prefix="llama-peer-"))
    peer_port = 18931
    peer = subprocess.Popen(
        [str(llama_server_binary()), "--model", str(gguf.path), "--port", str(peer_port), "--host", "127.0.0.1"]
        + ["--parallel", str(args.parallel), "--threads", str(args.threads), "--no-webui", "--no-repack"]
        + ["--ctx-size", str(2048 * args.parallel), "--no-kv-unified"],
        stdout=open(folder / "peer.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    ours = ServerProcess(
        "--engine",
        "llama-cpp",
        "--model",
        args.model,
        "--dtype",
        args.dtype,
        "--http-port",
        "18932",
        "--threads",
        str(args.threads),
        "--parallel",
        str(args.parallel),
    ).wait_ready()
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{peer_port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        sides = {
            "llama-cpp (ours)": "http://127.0.0.1:18932/v1/completions",
            "llama-server": f"http://127.0.0.1:{peer_port}/v1/completions",
        }
        print(f"weights {gguf.path.name} ({gguf.weights}), threads {args.threads}, {TOKENS} tokens, greedy")
        print("| users | ours tok/s | llama-server tok/s | ratio median (min-max) | TTFT p50 ours / theirs (s) |")
        print("| --- | --- | --- | --- | --- |")
        for n in users:
            figures: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
            for _ in range(args.rounds):
                for side, url in sides.items():
                    figures[side].append(asyncio.run(_step(url, n, args.model)))
            ours_tps = [f[0] for f in figures["llama-cpp (ours)"]]
            theirs_tps = [f[0] for f in figures["llama-server"]]
            ratios = [a / b for a, b in zip(ours_tps, theirs_tps)]
            ttft = [statistics.median(f[1] for f in figures[s]) for s in sides]
            print(
                f"| {n} | {statistics.median(ours_tps):.1f} | {statistics.median(theirs_tps):.1f} | "
                f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
                f"{ttft[0]:.3f} / {ttft[1]:.3f} |",
                flush=True,
            )
    finally:
        ours.stop()
        peer.terminate()
        peer.wait(10)


if __name__ == "__main__":
    main()
