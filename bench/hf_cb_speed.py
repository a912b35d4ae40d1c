"""hf-cb against `transformers serve --continuous-batching` and hf-kv, with one small async client (issue 12).

    .venv/bin/python -m bench.hf_cb_speed                      # SmolLM2-135M bf16, 1/4/16 users, 30 s each
    .venv/bin/python -m bench.hf_cb_speed --targets hf-cb --users 16 --seconds 10

One server at a time on free ports.  At each concurrency N, N users each send streaming
requests back to back (the log's prompts in turn, raw, greedy, up to 128 new tokens, EOS
honoured: `transformers serve`'s /v1/completions has no ignore_eos, so both sides do the
same work).  After a warm-up the tokens that arrive inside the timed window are counted;
TTFT is the client's time from sending to the first token, over the requests sent inside
the window (one still without a token at the end counts as slower than all, unless it was
sent in the window's last 2 s).

Both continuous-batching servers get the same KV cache (hf-cb's default, passed to
`transformers serve` as --cb-num-blocks / --cb-max-batch-tokens): left to itself on a CPU,
`transformers serve` sizes its cache from 90 % of the machine's RAM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from loadtest.prompts import LOG_SPEED_PROMPTS
from loadtest.server_process import ServerProcess
from server.wire import pb, pb_grpc

ROOT = Path(__file__).resolve().parent.parent
# A request still without a token when the window closes counts as slower than all, unless it was
# sent less than this long before the close.
CUT_OFF_GRACE_S = 2.0


@dataclass
class Window:
    """Tokens and first-token times that fall inside [start, end)."""

    start: float
    end: float
    tokens: int = 0
    ttfts: list[float] = field(default_factory=list)
    requests: int = 0
    server_cpu_s: float = 0.0

    def add_tokens(self, count: int, at: float) -> None:
        if self.start <= at < self.end:
            self.tokens += count

    def add_request(self, sent: float, first: float | None) -> None:
        if not self.start <= sent < self.end:
            return
        if first is None and self.end - sent < CUT_OFF_GRACE_S:
            return  # sent just before the end and cut off by it: no evidence either way
        self.requests += 1
        self.ttfts.append(math.inf if first is None else first - sent)


# ---- clients: one request each, reporting (tokens, arrival time) and the first token's time ----------


async def grpc_request(stub, prompt: str, max_new_tokens: int, window: Window) -> None:
    call = stub.GenerateStream(
        pb.GenerateRequest(prompt=prompt, params=pb.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    )
    sent, first = time.monotonic(), None
    try:
        async for chunk in call:
            now = time.monotonic()
            if chunk.token_ids:
                first = first or now
                window.add_tokens(len(chunk.token_ids), now)
    finally:
        call.cancel()
        window.add_request(sent, first)


async def openai_request(client, url: str, model: str, prompt: str, max_new_tokens: int, window: Window) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0, "stream": True}
    sent, first, counted = time.monotonic(), None, 0
    try:
        async with client.stream("POST", url, json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.monotonic()
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    # Its streamer sends a chunk per token (less while a character is incomplete);
                    # the usage on the last chunk settles the difference.
                    first = first or now
                    counted += 1
                    window.add_tokens(1, now)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                    if tokens and first is None:
                        first = now  # tokens without text (EOS at once): the first came with the end
                    window.add_tokens(tokens - counted, now)
    finally:
        window.add_request(sent, first)


async def run_level(send, users: int, warmup_s: float, seconds: float, server_pid: int) -> Window:
    """``users`` closed-loop users for warm-up + window; the window's figures, the server's CPU time in it."""
    start = time.monotonic() + warmup_s
    window = Window(start, start + seconds)
    turn = iter(range(10**9))

    async def user(index: int) -> None:
        while time.monotonic() < window.end:
            prompt = LOG_SPEED_PROMPTS[(index + next(turn)) % len(LOG_SPEED_PROMPTS)]
            await send(prompt, window)

    tasks = [asyncio.ensure_future(user(i)) for i in range(users)]
    await asyncio.sleep(max(0.0, window.start - time.monotonic()))
    cpu_start = _process_jiffies([server_pid])
    await asyncio.sleep(max(0.0, window.end - time.monotonic()))
    window.server_cpu_s = (_process_jiffies([server_pid]) - cpu_start) / os.sysconf("SC_CLK_TCK")
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return window


# ---- targets ------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def yayi_target(engine: str, args):
    extra = args.hf_cb_args if engine == "hf-cb" else []
    server = ServerProcess(
        "--engine", engine, "--model", args.model, "--dtype", args.dtype, *extra, ready_timeout=600
    ).wait_ready(600)
    channel = grpc.aio.insecure_channel(server.address)
    stub = pb_grpc.InferenceStub(channel)
    info = await stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
    print(f"# {engine}: attention {info.attention}; KV cache {info.kv_cache_tokens} tokens", flush=True)
    try:
        yield (lambda prompt, window: grpc_request(stub, prompt, args.max_new_tokens, window)), server.process.pid
    except BaseException:
        print(f"# {engine} server's last lines:", *server.lines[-15:], sep="\n#   ", flush=True)
        raise
    finally:
        await channel.close()
        server.stop()


@contextlib.asynccontextmanager
async def transformers_serve_target(args):
    import httpx

    from engines.hf_cb import CBOptions
    from engines.hf_cb_runtime import AUTO_MAX_BATCH_TOKENS
    from engines.models import resolve_model

    model_dir = str(resolve_model(args.model))
    num_blocks, max_batch_tokens = same_cache_as_hf_cb(model_dir, args.dtype)
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "transformers"),
        "serve",
        model_dir,
        "--continuous-batching",
        "--dtype",
        args.dtype,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--cb-num-blocks",
        str(num_blocks),
        "--cb-block-size",
        str(CBOptions().block_size),
        "--cb-max-batch-tokens",
        str(max_batch_tokens or AUTO_MAX_BATCH_TOKENS["cpu"]),
    ]
    print("# transformers-serve:", " ".join(command[1:]), flush=True)
    log = tempfile.NamedTemporaryFile("w", prefix="transformers-serve-", suffix=".log", delete=False)
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=64)) as client:
            for _ in range(600):
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{base}/health")).status_code == 200:
                        break
                if process.poll() is not None:
                    raise RuntimeError(f"transformers serve exited ({process.returncode}); see {log.name}")
                await asyncio.sleep(1)

            def send(prompt, window):
                return openai_request(client, f"{base}/v1/completions", model_dir, prompt, args.max_new_tokens, window)

            yield send, process.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def same_cache_as_hf_cb(model_dir: str, dtype: str) -> tuple[int, int]:
    import torch
    from transformers import AutoConfig

    from engines.hf_cb import DEFAULT_MAX_RUNNING, CBOptions
    from engines.hf_cb_runtime import plan_cache
    from engines.hf_model import DTYPES

    options = CBOptions()
    plan = plan_cache(
        AutoConfig.from_pretrained(model_dir).get_text_config(),
        DTYPES[dtype],
        torch.device("cpu"),
        options.num_blocks,
        options.block_size,
        options.max_batch_tokens,
        DEFAULT_MAX_RUNNING["cpu"],
    )
    return plan.num_blocks, plan.max_batch_tokens


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- the machine: this CPU is shared, so each point says how busy the rest of it was -----------------


def _busy_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _process_jiffies(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


class OtherLoad:
    """CPU used by processes other than ``pids`` over a span, as a share of the whole machine."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    def __enter__(self) -> OtherLoad:
        self.busy, self.total = _busy_jiffies()
        self.ours = _process_jiffies(self.pids)
        return self

    def __exit__(self, *_) -> None:
        busy, total = _busy_jiffies()
        ours = _process_jiffies(self.pids) - self.ours
        self.share = max(0.0, (busy - self.busy - ours) / max(total - self.total, 1))


async def wait_for_quiet(pids: list[int], limit: float, timeout: float) -> float:
    """Waits (up to ``timeout``) until other processes use less than ``limit`` of the machine; their share."""
    deadline = time.monotonic() + timeout
    while True:
        with OtherLoad(pids) as load:
            await asyncio.sleep(2)
        if load.share < limit or time.monotonic() > deadline:
            return load.share


# ---- the run ------------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    send: object
    pid: int


async def open_target(stack: contextlib.AsyncExitStack, name: str, args) -> Target:
    context = transformers_serve_target(args) if name == "transformers-serve" else yayi_target(name, args)
    send, pid = await stack.enter_async_context(context)
    await send(LOG_SPEED_PROMPTS[0], Window(0, math.inf))  # lazy set-up (transformers serve makes its manager)
    return Target(name, send, pid)


async def measure(args) -> list[dict]:
    """Every target's server up at once (idle between its points), then each concurrency target after target,
    round after round: the figures compared sit minutes apart, not a whole sweep apart."""
    rows = []
    async with contextlib.AsyncExitStack() as stack:
        targets = [await open_target(stack, name, args) for name in args.targets]
        pids = [os.getpid()] + [t.pid for t in targets]
        for round_ in range(1, args.rounds + 1):
            for users in args.users:
                for target in targets:
                    if target.name == "hf-kv" and users not in args.hf_kv_users:
                        continue
                    quiet = await wait_for_quiet(pids, args.quiet_below, args.quiet_timeout)
                    with OtherLoad(pids) as load:
                        window = await run_level(target.send, users, args.warmup, args.seconds, target.pid)
                    finite = [t for t in window.ttfts if math.isfinite(t)]
                    row = {
                        "round": round_,
                        "target": target.name,
                        "users": users,
                        "tokens_per_s": window.tokens / args.seconds,
                        "ttft_p50_ms": statistics.median(window.ttfts) * 1000 if window.ttfts else math.nan,
                        "requests": window.requests,
                        "without_first_token": len(window.ttfts) - len(finite),
                        "other_load_before": quiet,
                        "other_load": load.share,
                        "server_cpu_ms_per_token": window.server_cpu_s * 1000 / max(window.tokens, 1),
                    }
                    print(format_row(row), flush=True)
                    rows.append(row)
    return rows


def format_row(row: dict) -> str:
    ttft = "> window" if math.isinf(row["ttft_p50_ms"]) else f"{row['ttft_p50_ms']:.0f}"
    return (
        f"| {row['round']} | {row['target']} | {row['users']} | {row['tokens_per_s']:.1f} | {ttft} | "
        f"{row['requests']} ({row['without_first_token']} without a token) | "
        f"{row['server_cpu_ms_per_token']:.1f} | {row['other_load']:.0%} |"
    )


def summary(rows: list[dict], clean_below: float) -> list[str]:
    """Medians over rounds, from the points the rest of the machine left alone where there are any
    (marked * where there are none), and hf-cb's ratios to the others."""
    cells: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        cells.setdefault((row["target"], row["users"]), []).append(row)
    median, marks = {}, {}
    for key, group in cells.items():
        clean = [r for r in group if r["other_load"] < clean_below]
        marks[key] = f"{len(clean)}/{len(group)}" if clean else f"0/{len(group)} *"
        group = clean or group
        median[key] = tuple(
            statistics.median(r[name] for r in group)
            for name in ("tokens_per_s", "ttft_p50_ms", "server_cpu_ms_per_token")
        )
    lines = [
        "",
        f"medians over the rounds where other processes took under {clean_below:.0%} of the CPU:",
        "| target | users | tokens/s | TTFT p50 ms | server CPU ms/token | rounds used |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {t} | {u} | {tps:.1f} | {ttft:.0f} | {cpu:.1f} | {marks[(t, u)]} |"
        for (t, u), (tps, ttft, cpu) in sorted(median.items())
    ]
    for (target, users), (tps, ttft, _) in sorted(median.items()):
        if target != "hf-cb":
            continue
        for other in ("transformers-serve", "hf-kv"):
            if (other, users) in median and median[(other, users)][0] > 0:
                other_tps, other_ttft, _ = median[(other, users)]
                lines.append(
                    f"hf-cb / {other} at {users} users: {tps / other_tps:.2f}x tokens/s, "
                    f"TTFT p50 {ttft:.0f} vs {other_ttft:.0f} ms"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--targets",
        default="hf-cb,transformers-serve,hf-kv",
        help="comma-separated: hf-cb, transformers-serve, hf-kv (any yayi engine name works)",
    )
    parser.add_argument("--users", default="1,4,16")
    parser.add_argument("--hf-kv-users", default="16", help="the concurrencies hf-kv runs at (it serves one at a time)")
    parser.add_argument("--seconds", type=float, default=30.0, help="timed window per point")
    parser.add_argument("--warmup", type=float, default=5.0, help="untimed seconds before each window")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the sweep; the summary gives medians")
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=0.15,
        help="before each point, wait until other processes use less than this share of the CPU",
    )
    parser.add_argument("--quiet-timeout", type=float, default=60.0, help="seconds to wait for that at most")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--hf-cb-arg",
        dest="hf_cb_args",
        action="append",
        default=[],
        help="extra yayi-serve argument for hf-cb (repeat), e.g. --hf-cb-arg=--block-size=64",
    )
    args = parser.parse_args(argv)
    args.targets = args.targets.split(",")
    args.users = [int(u) for u in args.users.split(",")]
    args.hf_kv_users = [int(u) for u in args.hf_kv_users.split(",")]
    print(
        f"# {args.model} {args.dtype}, greedy, up to {args.max_new_tokens} new tokens, EOS honoured, streaming; "
        f"{args.warmup:g} s warm-up + {args.seconds:g} s window per point; {os.cpu_count()} CPUs",
        flush=True,
    )
    print(
        "| round | target | users | tokens/s | TTFT p50 ms | requests in window | server CPU ms/token "
        "| other processes' CPU |\n"
        "| ---: | --- | ---: | ---: | ---: | --- | ---: | ---: |",
        flush=True,
    )
    rows = asyncio.run(measure(args))
    for line in summary(rows, args.quiet_below):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
