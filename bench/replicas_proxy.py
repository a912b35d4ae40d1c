"""Locust through HAProxy in front of N replicas against one replica directly (``make bench-replicas``).

The same Locust load three times (the log's speed prompts, greedy, exactly --max-new-tokens each):

1. one replica, called directly;
2. the same replica behind HAProxy: what the proxy itself costs (TTFT p50, proxied minus direct);
   before the load, 1-token calls one at a time, alternating, show its cost per call with no queue;
3. N replicas behind HAProxy: how evenly it spreads the calls (each replica's own count of the
   calls it served) and what N replicas give on this machine.

Absolute speed only scales where the machine has the cores for every replica: on a 2-core machine
two replicas share the same two cores. The load average before and after each run is in the report,
since other processes on a shared machine move every figure.
"""

from __future__ import annotations

import argparse
import os
import time

from loadtest import ROOT
from loadtest.compare.locust_run import LoadSpec, run_locust
from loadtest.launch.replicas import Replicas
from loadtest.launch.server_process import open_channel, request
from loadtest.measure import scrape
from loadtest.measure.report_folder import Report
from loadtest.measure.token_stats import percentile
from server.grpc.wire import pb_grpc

LOCUSTFILE = ROOT / "loadtest" / "speed.py"
COLUMNS = [
    "run",
    "replicas",
    "users",
    "requests_ok",
    "requests_failed",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "itl_p50_ms",
    "e2e_p50_ms",
    "output_tokens_per_s",
    "share_per_replica",
    "load_avg_1m_before",
    "load_avg_1m_after",
]


def served(replicas: Replicas) -> list[float]:
    """Streaming calls each replica has finished, whatever their status (its own counter)."""
    return [
        scrape.total(scrape.read(r.server.metrics_port), "yayi_requests_total", method="GenerateStream") or 0.0
        for r in replicas.replicas
    ]


def warm_up(host: str, calls: int) -> None:
    """A few calls first, so no run pays for a replica's first requests (lazy initialisation)."""
    channel = open_channel(host)
    stub = pb_grpc.InferenceStub(channel)
    for i in range(calls):
        stub.Generate(request(f"warm-up {i}", max_new_tokens=8), timeout=120)
    channel.close()


def call_latency(hosts: dict[str, str], calls: int) -> dict[str, float]:
    """p50 ms of a 1-token Generate per host, one call at a time, the hosts alternating: the proxy's own
    cost per call, which a loaded run's TTFT (mostly time queued for the engine) cannot show."""
    stubs = {name: pb_grpc.InferenceStub(open_channel(host)) for name, host in hosts.items()}
    times: dict[str, list[float]] = {name: [] for name in hosts}
    for i in range(calls):
        for name, stub in stubs.items():
            started = time.perf_counter()
            stub.Generate(request(f"ping {i}", max_new_tokens=1), timeout=60)
            times[name].append(time.perf_counter() - started)
    return {name: percentile(values, 50) * 1000 for name, values in times.items()}


def run(name: str, host: str, replicas: Replicas, load: LoadSpec, report: Report) -> dict:
    warm_up(host, 2 * len(replicas.replicas))
    print(f"# {name}: {load.users} users for {load.duration_s:g}s against {host}", flush=True)
    before = served(replicas)
    load_before = os.getloadavg()[0]
    summary = run_locust(LOCUSTFILE, host, load, report.dir / "raw" / name)
    counts = [after - b for after, b in zip(served(replicas), before)]
    total = sum(counts) or 1.0
    return {
        "run": name,
        "replicas": len(replicas.replicas),
        **summary,
        "share_per_replica": " / ".join(f"{c / total:.0%}" for c in counts),
        "load_avg_1m_before": round(load_before, 2),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="hf-kv")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per run")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--calls", type=int, default=200, help="1-token calls per host for the no-load latency")
    parser.add_argument("--out", help="report folder (default reports/replicas-<UTC time>)")
    args = parser.parse_args(argv)
    report = Report("replicas", args.out, "bench.replicas_proxy", argv)
    (report.dir / "raw").mkdir(exist_ok=True)
    load = LoadSpec(users=args.users, duration_s=args.duration, max_new_tokens=args.max_new_tokens)
    serve = ["--engine", args.engine, "--model", args.model]
    rows = []
    # HAProxy's config and log beside the report.
    with Replicas(1, serve, workdir=report.dir / "haproxy-1") as one:
        warm_up(one.address, 2)
        idle = call_latency({"direct": one.replicas[0].server.address, "haproxy": one.address}, args.calls)
        rows.append(run("direct", one.replicas[0].server.address, one, load, report))
        rows.append(run("haproxy-1", one.address, one, load, report))
    with Replicas(args.replicas, serve, workdir=report.dir / f"haproxy-{args.replicas}") as many:
        rows.append(run(f"haproxy-{args.replicas}", many.address, many, load, report))
    direct, proxied, spread = (row["ttft_p50_ms"] for row in rows)
    report.table(
        "runs",
        rows,
        COLUMNS,
        title=f"{args.engine} on {args.model}, {args.users} users, {args.duration:g} s each",
        note=(
            f"The proxy's cost in TTFT p50 (the same replica behind HAProxy minus directly): "
            f"{proxied - direct:+.1f} ms ({(proxied - direct) / direct:+.1%}); "
            f"{args.replicas} replicas behind HAProxy against one directly: {spread - direct:+.1f} ms "
            f"({(spread - direct) / direct:+.1%}). "
            f"Requests per replica behind HAProxy: {rows[2]['share_per_replica']}. "
            f"With no load, a 1-token Generate took {idle['direct']:.2f} ms directly and {idle['haproxy']:.2f} ms "
            f"through HAProxy (p50 of {args.calls} each, alternating): {idle['haproxy'] - idle['direct']:+.2f} ms."
        ),
    )
    print(report.markdown_path.read_text())


if __name__ == "__main__":
    main()
