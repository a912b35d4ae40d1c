"""Where a server's CPU goes while it streams: tokens/s, the busy share of a core for each of its
threads, from /proc (Linux), and the server process's CPU per token streamed; hf-cb's engine
process (its default, ``--engine-process``) is shown apart, thread by thread.

    .venv/bin/python -m bench.server_threads --engine hf-cb --model smollm2-135m --dtype bfloat16
    .venv/bin/python -m bench.server_threads --engine llama-cpp --users 16

With an engine whose kernels run in a child process (llama-cpp's llama-server), the server's own
CPU is what our request path costs on top of the kernels: milliseconds of CPU per token, taken
from the cores the kernels would otherwise have.

Written to find why hf-cb left a third of this machine's two cores idle: a torch forward on
a CPU hands work to an OpenMP pool, and a worker of that pool that is mostly asleep shows
here as a thread well below one core (README, "Continuous batching: hf-cb").
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loadtest.launch.server_process import ServerProcess


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


def switch_interval_env(seconds: float) -> dict[str, str]:
    """An environment whose Python runs ``sys.setswitchinterval(seconds)`` at start (a sitecustomize
    module ahead on PYTHONPATH): the server has no flag for it, and should not."""
    folder = Path(tempfile.mkdtemp(prefix="yayi-switch-"))
    (folder / "sitecustomize.py").write_text(f"import sys\nsys.setswitchinterval({seconds!r})\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH", "")]))}


def sampler(pid: int, path: str) -> subprocess.Popen:
    """py-spy sampling every thread of ``pid`` (native frames off: Python's own costs are the question)."""
    command = ["py-spy", "record", "--pid", str(pid), "--subprocesses", "--format", "raw", "--output", path]
    command += ["--rate", "250"]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches before the streams start
    return spy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="hf-cb")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=96, help="new tokens of each stream (ignore_eos)")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--users", type=int, default=1, help="streams at once, each --tokens long")
    parser.add_argument("--server-args", default="", help="extra yayi-serve arguments, one string")
    parser.add_argument(
        "--profile",
        default="",
        help="also sample the server with py-spy while it streams: collapsed stacks here (py-spy pauses the "
        "server for each sample, so tokens/s under --profile is not a figure to report)",
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="the server's sys.setswitchinterval in seconds (Python's default 0.005): how long a thread that "
        "wants the GIL waits for the one holding it, here the event loop against hf-cb's manager thread",
    )
    args = parser.parse_args(argv)
    extra = shlex.split(args.server_args)
    env = switch_interval_env(args.switch_interval) if args.switch_interval is not None else None
    server = ServerProcess(
        "--engine", args.engine, "--model", args.model, "--dtype", args.dtype, *extra, env=env
    ).wait_ready(600)

    def one(_: int) -> int:
        stream = server.stream(args.prompt, max_new_tokens=args.tokens, ignore_eos=True, timeout=600)
        return sum(len(chunk.token_ids) for chunk in stream)

    try:
        with ThreadPoolExecutor(args.users) as pool:
            list(pool.map(one, range(args.users)))  # warm-up: every slot once
            spy = sampler(server.process.pid, args.profile) if args.profile else None
            processes = {"server": server.process.pid}
            processes |= {f"engine process {child.pid}": child.pid for child in server.engine_processes()}
            before = {what: thread_ticks(pid) for what, pid in processes.items()}
            started = time.perf_counter()
            tokens = sum(pool.map(one, range(args.users)))
        seconds = time.perf_counter() - started
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled on SIGINT
            spy.wait(30)
        rows = {what: busy_cores(before[what], thread_ticks(pid), seconds) for what, pid in processes.items()}
    finally:
        server.stop()
    what = f"{args.engine} {args.model} {args.dtype}, {args.users} users"
    if args.switch_interval is not None:
        what += f", switch interval {args.switch_interval:g} s"
    print(f"{what}: {tokens} tokens in {seconds:.2f} s, {tokens / seconds:.1f} tokens/s")
    for process, threads in rows.items():
        busy = sum(row[0] for row in threads)
        print(f"{process} CPU: {busy:.2f} cores, {busy * seconds / tokens * 1000:.3f} ms per token")
        for cores, tid, name in threads[:8]:
            print(f"  thread {tid} ({name}): {cores:.2f} of a core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
