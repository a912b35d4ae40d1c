"""Where a server's CPU goes while it streams one request: tokens/s, and the busy share of a core
for each of its threads, from /proc (Linux).

    .venv/bin/python -m bench.server_threads --engine hf-cb --model smollm2-135m --dtype bfloat16

Written to find why hf-cb left a third of this machine's two cores idle: a torch forward on
a CPU hands work to an OpenMP pool, and a worker of that pool that is mostly asleep shows
here as a thread well below one core (README, "Continuous batching: hf-cb").
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from loadtest.server_process import ServerProcess


def thread_ticks(pid: int) -> dict[str, tuple[str, int]]:
    """Each thread's name and CPU clock ticks so far (user + system)."""
    ticks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat, open(f"/proc/{pid}/task/{tid}/comm") as comm:
                fields = stat.read().rsplit(")", 1)[1].split()
                ticks[tid] = (comm.read().strip(), int(fields[11]) + int(fields[12]))
        except OSError:  # a thread that ended meanwhile
            continue
    return ticks


def busy_cores(before: dict, after: dict, seconds: float) -> list[tuple[float, str, str]]:
    per_second = os.sysconf("SC_CLK_TCK") * seconds
    rows = [((ticks - before.get(tid, (name, 0))[1]) / per_second, tid, name) for tid, (name, ticks) in after.items()]
    return sorted((row for row in rows if row[0] > 0), reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="hf-cb")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=96, help="new tokens of the one request (ignore_eos)")
    parser.add_argument("--prompt", default="The capital of France is")
    args = parser.parse_args(argv)
    server = ServerProcess("--engine", args.engine, "--model", args.model, "--dtype", args.dtype).wait_ready(600)
    try:
        for _ in server.stream("Warm up.", max_new_tokens=8, ignore_eos=True, timeout=300):
            pass
        before, started, tokens = thread_ticks(server.process.pid), time.perf_counter(), 0
        for chunk in server.stream(args.prompt, max_new_tokens=args.tokens, ignore_eos=True, timeout=600):
            tokens += len(chunk.token_ids)
        seconds = time.perf_counter() - started
        rows = busy_cores(before, thread_ticks(server.process.pid), seconds)
    finally:
        server.stop()
    what = f"{args.engine} {args.model} {args.dtype}"
    print(f"{what}: {tokens} tokens in {seconds:.2f} s, {tokens / seconds:.1f} tokens/s")
    print(f"server CPU: {sum(row[0] for row in rows):.2f} cores")
    for cores, tid, name in rows[:8]:
        print(f"  thread {tid} ({name}): {cores:.2f} of a core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
