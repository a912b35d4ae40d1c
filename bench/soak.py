"""Soak: thousands of short requests mixed with cancels, deadlines, bad input and injected
faults against a real server (``make soak``).

Every request has an expected outcome fixed before it is sent: greedy completions must
equal the reference taken at start, sampled ones must have the asked length, a cancelled
stream must read CANCELLED, a too-short deadline DEADLINE_EXCEEDED, bad input
INVALID_ARGUMENT, an injected engine fault INTERNAL.  After the last request the running
and waiting gauges must be back at 0, the server must have finished as many requests as
were sent, and its resident memory (children included: vLLM's engine processes) must not
grow by more than the bound between the end of warm-up and the end.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import psutil

from engines.faults import ENV_VAR as FAULTS_ENV
from loadtest.launch.server_process import ServerProcess
from loadtest.measure import scrape
from loadtest.measure.prompts import LOG_SPEED_PROMPTS

FAULT_MARKER = "SOAK-FAULT"
# The log's prompts, plus one beyond ASCII (CJK, an emoji: characters whose bytes span tokens),
# so streaming whole characters is soaked under cancels and deadlines too.
PROMPTS = [*LOG_SPEED_PROMPTS, "今天天气怎么样？🌞"]
GREEDY = dict(max_new_tokens=8, ignore_eos=True)
# Each is INVALID_ARGUMENT on any engine and model the soak runs.
BAD_INPUTS = [
    ("", {}),
    ("   ", {}),
    ("word " * 1200, {}),
    ("hi", dict(max_new_tokens=0)),
    ("hi", dict(max_new_tokens=5000)),
    ("hi", dict(temperature=-1.0)),
    ("hi", dict(temperature=float("nan"))),
    ("hi", dict(top_p=0.0)),
    ("hi", dict(top_k=10**6)),
    ("hi", dict(repetition_penalty=0.0)),
    ("hi", dict(stop=[""])),
    ("hi", dict(stop=[f"s{i}" for i in range(17)])),
]
# kind: (weight, expected status)
MIX = {
    "greedy": (35, "OK"),
    "greedy-stream": (20, "OK"),
    "sampled": (10, "OK"),
    "cancel": (10, "CANCELLED"),
    "deadline": (10, "DEADLINE_EXCEEDED"),
    "bad-input": (10, "INVALID_ARGUMENT"),
    "fault": (5, "INTERNAL"),
}


@dataclass
class SoakResult:
    engine: str
    requests: int = 0
    by_status: collections.Counter = field(default_factory=collections.Counter)
    unexpected: list[str] = field(default_factory=list)
    server_by_status: dict[str, float] = field(default_factory=dict)
    rss_start: int = 0
    rss_warm: int = 0
    rss_end: int = 0
    gauges_end: tuple[float, float] = (-1.0, -1.0)
    seconds: float = 0.0

    def statuses_agree(self) -> bool:
        return all(self.server_by_status.get(k, 0) == v for k, v in self.by_status.items())

    @property
    def growth(self) -> float:
        return (self.rss_end - self.rss_warm) / self.rss_warm

    def problems(self, max_growth: float) -> list[str]:
        found = [f"{len(self.unexpected)} unexpected outcomes, e.g. {self.unexpected[:3]}"] if self.unexpected else []
        if self.gauges_end != (0.0, 0.0):
            found.append(f"running/waiting gauges ended at {self.gauges_end}, not 0")
        if sum(self.server_by_status.values()) != self.requests:
            found.append(
                f"server finished {sum(self.server_by_status.values()):g} requests, client sent {self.requests}"
            )
        if self.growth >= max_growth:
            found.append(f"RSS grew {self.growth:.1%} after warm-up (bound {max_growth:.0%})")
        return found


def tree_rss(pid: int) -> int:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def wait_idle(server: ServerProcess, timeout: float = 30.0) -> tuple[float, float]:
    deadline = time.monotonic() + timeout
    while True:
        values = scrape.read(server.metrics_port, timeout=10)
        gauges = (scrape.total(values, "yayi_requests_running"), scrape.total(values, "yayi_requests_waiting"))
        if gauges == (0.0, 0.0) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.1)


class Client:
    def __init__(self, server: ServerProcess, references: dict[str, tuple[int, ...]]) -> None:
        self.server = server
        self.references = references

    def run(self, kind: str, rng: random.Random) -> tuple[str, str | None]:
        """Returns (status, what was wrong with an OK answer or None)."""
        try:
            return "OK", getattr(self, "_" + kind.replace("-", "_"))(rng)
        except grpc.RpcError as error:
            return error.code().name, None

    def _greedy(self, rng):
        prompt = rng.choice(PROMPTS)
        response = self.server.generate(prompt, **GREEDY)
        return None if tuple(response.token_ids) == self.references[prompt] else f"greedy tokens differ for {prompt!r}"

    def _greedy_stream(self, rng):
        prompt = rng.choice(PROMPTS)
        chunks = list(self.server.stream(prompt, **GREEDY))
        tokens = tuple(t for c in chunks for t in c.token_ids)
        if tokens != self.references[prompt] or chunks[-1].finish_reason != "length":
            return f"streamed greedy tokens differ for {prompt!r}"
        return None

    def _sampled(self, rng):
        response = self.server.generate(
            rng.choice(PROMPTS),
            max_new_tokens=8,
            ignore_eos=True,
            temperature=0.9,
            top_p=0.95,
            seed=rng.randrange(2**32),
        )
        return None if response.usage.completion_tokens == len(response.token_ids) == 8 else "sampled length wrong"

    def _cancel(self, rng):
        # Sampled: a random model's greedy path can dwell on tokens without text, which would
        # hold every chunk back to the end.
        stream = self.server.stream(
            rng.choice(PROMPTS), max_new_tokens=400, ignore_eos=True, temperature=1.0, seed=rng.randrange(2**32)
        )
        for _ in range(rng.randint(1, 3)):
            if next(stream, None) is None:
                return "the stream ended before it could be cancelled"
        stream.cancel()
        list(stream)  # raises CANCELLED
        return "a cancelled stream ended normally"

    def _deadline(self, rng):
        self.server.generate(rng.choice(PROMPTS), timeout=rng.uniform(0.05, 0.4), max_new_tokens=900, ignore_eos=True)
        return "a 900-token generation beat its deadline"

    def _bad_input(self, rng):
        prompt, params = rng.choice(BAD_INPUTS)
        self.server.generate(prompt, **params)
        return "bad input was served"

    def _fault(self, rng):
        self.server.generate(f"{FAULT_MARKER} {rng.choice(PROMPTS)}", **GREEDY)
        return "an injected fault was served"


def run_soak(
    engine: str,
    model: str,
    requests: int,
    warmup: int,
    concurrency: int,
    server_args: list[str] = (),
    seed: int = 0,
    log=print,
) -> SoakResult:
    rng = random.Random(seed)
    kinds = rng.choices(list(MIX), weights=[w for w, _ in MIX.values()], k=requests)
    seeds = [rng.randrange(2**32) for _ in kinds]
    # The injected faults are test-only: the server refuses the variable without --allow-test-faults.
    server = ServerProcess(
        "--engine",
        engine,
        "--model",
        model,
        "--max-queue",
        str(concurrency * 2),
        "--allow-test-faults",
        *server_args,
        env={FAULTS_ENV: f"error:{FAULT_MARKER}@1"},
    ).wait_ready(900)
    result = SoakResult(engine=engine)
    try:
        references = {p: tuple(server.generate(p, **GREEDY).token_ids) for p in PROMPTS}
        client = Client(server, references)
        result.rss_start = tree_rss(server.process.pid)
        started = time.monotonic()

        def one(i: int) -> None:
            status, wrong = client.run(kinds[i], random.Random(seeds[i]))
            result.by_status[status] += 1
            expected = MIX[kinds[i]][1]
            if status != expected or wrong:
                result.unexpected.append(
                    f"#{i} {kinds[i]}: {status}" + (f" ({wrong})" if wrong else "") + f", expected {expected}"
                )

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(min(warmup, requests))))
            wait_idle(server)
            result.rss_warm = tree_rss(server.process.pid)
            log(f"{engine}: warm-up of {min(warmup, requests)} requests done, RSS {result.rss_warm / 2**20:.0f} MiB")
            list(pool.map(one, range(min(warmup, requests), requests)))
        result.seconds = time.monotonic() - started
        result.requests = requests + len(PROMPTS)  # the reference requests are served requests too
        result.by_status["OK"] += len(PROMPTS)
        result.gauges_end = wait_idle(server)
        result.rss_end = tree_rss(server.process.pid)
        result.server_by_status = scrape.by_label(
            scrape.read(server.metrics_port, timeout=10), "yayi_requests_total", "status"
        )
    finally:
        server.stop()
    return result


def report(result: SoakResult, max_growth: float) -> str:
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    lines = [
        f"engine {result.engine}: {result.requests} requests in {result.seconds:.0f} s "
        f"({result.requests / max(result.seconds, 1e-9):.1f}/s)",
        "  client saw by status: " + ", ".join(f"{k} {v}" for k, v in sorted(result.by_status.items())),
        "  server counted:       " + ", ".join(f"{k} {v:g}" for k, v in sorted(result.server_by_status.items())),
        "  server and client agree on every status"
        if result.statuses_agree()
        else "  server and client disagree on some statuses (a deadline counted as a cancel or the reverse)",
        f"  unexpected outcomes:  {len(result.unexpected)}"
        + (f" {result.unexpected[:5]}" if result.unexpected else ""),
        f"  RSS (server and its children): start {mib(result.rss_start)}, after warm-up {mib(result.rss_warm)}, "
        f"end {mib(result.rss_end)}; growth after warm-up {result.growth:+.2%} (bound {max_growth:.0%})",
        f"  gauges at the end: running {result.gauges_end[0]:g}, waiting {result.gauges_end[1]:g}",
    ]
    problems = result.problems(max_growth)
    lines.append("  PASS" if not problems else "  FAIL: " + "; ".join(problems))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="hf-kv,vllm")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300, help="requests before the after-warm-up RSS reading")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads")
    parser.add_argument("--max-growth", type=float, default=0.05, help="allowed RSS growth after warm-up (0.05 = 5%%)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    mix = ", ".join(f"{kind} {weight}%" for kind, (weight, _) in MIX.items())
    print(
        f"soak: {args.requests} requests per engine on {args.model}, {args.concurrency} client threads, mix: {mix}",
        flush=True,
    )
    failed = False
    for engine in args.engines.split(","):
        # vLLM on a CPU: eager mode starts in seconds where compiling takes minutes, and the
        # soak is about leaks and statuses, not speed.
        extra = ["--enforce-eager", "true"] if engine == "vllm" else []
        result = run_soak(engine, args.model, args.requests, args.warmup, args.concurrency, extra, args.seed)
        print(report(result, args.max_growth), flush=True)
        failed |= bool(result.problems(args.max_growth))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
