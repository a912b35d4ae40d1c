"""``python -m loadtest.capacity`` (``make capacity``): every engine and its outside peers, one
seeded trace replayed against each at every rate of a search to saturation, the rounds
interleaved; then each past its capacity, ours with and without the admission bound in time;
then ``vllm bench serve`` at each capacity point as a second clock.  Writes reports/capacity-<UTC time>/."""

from __future__ import annotations

import asyncio
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.capacity import client, report, second_clock, sweep, trace, workloads
from loadtest.capacity.config import CapacityConfig, parse
from loadtest.compare.targets import (
    TargetConfig,
    TransformersServeTarget,
    YayiTarget,
    baseline_target,
    chosen_baselines,
    parse_baselines,
    vllm_engine_args,
)
from loadtest.compare.variants import by_label
from loadtest.measure.report_folder import Report

# The count bound our servers run with, as a user starts yayi-serve: the time bound is the one compared.
QUEUE = 64
BOUND_SUFFIX = "+wait"


@dataclass
class Run:
    """One target in the run: the server, how the client reaches it, its search, its rows."""

    target: object
    ignore_eos: bool
    search: sweep.Search | None
    rows: list[dict] = field(default_factory=list)
    failed: str = ""
    bound_of: str = ""  # for a server with --max-queue-wait: the label of the same engine without it
    variant: bool = False  # a --variant: searched for its capacity only (no overload step, no second clock)

    @property
    def label(self) -> str:
        return self.target.label

    def wire(self):
        target = self.target
        if isinstance(target, YayiTarget) and target.api == "grpc":
            return client.GrpcWire(target.server.address, ignore_eos=self.ignore_eos)
        served = target.model if isinstance(target, YayiTarget) else target.served_name
        return client.HttpWire(
            target.openai_url,
            served,
            ignore_eos=self.ignore_eos,
            fresh_connection=getattr(target, "fresh_connection", False),
            continuous_usage=isinstance(target, YayiTarget) or "vllm" in target.label,
        )


def queue_wait_bound(config: CapacityConfig, terms: tuple[sweep.Term, ...]) -> float | None:
    if config.max_queue_wait_s < 0:
        return None
    if config.max_queue_wait_s > 0:
        return config.max_queue_wait_s
    ttft = [t.bound_s for t in terms if t.metric == "ttft"]
    return ttft[0] / 2 if ttft else 1.0


def make_runs(config: CapacityConfig, model_path: str, raw: Path, terms, second_clock: bool) -> list[Run]:
    names = config.engine_names()
    variants = by_label(config.variant)
    # A variant is its engine wherever a label stands for a kind of server (its peers, its flags).
    engines = [variants[name].engine if name in variants else name for name in names]
    apis = [api.strip() for api in config.apis.split(",") if api.strip()]
    if not set(apis) <= {"grpc", "http"} or not apis:
        raise SystemExit(f"capacity: error: --apis takes grpc, http or grpc,http, got {config.apis!r}")
    try:
        baselines = chosen_baselines(parse_baselines(config.baseline), [n for n in names if n not in variants])
    except Exception as exc:
        raise SystemExit(f"capacity: error: {exc}") from None
    targets_config = TargetConfig(
        model=config.model,
        model_path=model_path,
        dtype=config.dtype,
        vllm_dtype=config.vllm_dtype,
        kv_cache_gb=config.kv_cache_gb,
        max_model_len=None,
        sample_period=config.sample_period_s,
        baseline_args=tuple(shlex.split(config.baseline_args)),
        transformers_serve_args=tuple(shlex.split(config.transformers_serve_args)),
        server_args=tuple(shlex.split(config.server_args)),
        llama_server_args=tuple(shlex.split(config.llama_server_args)),
    )
    runs: list[Run] = []
    common = shlex.split(config.server_args) + (["--trust-remote-code"] if config.trust_remote_code else [])
    search_args = dict(
        start=config.start_rate, factor=config.factor, maximum=config.max_rate, tolerance=config.tolerance
    )
    for name, engine in zip(names, engines):
        extra = vllm_engine_args(targets_config) if engine == "vllm" else ["--dtype", config.dtype]
        if second_clock and apis == ["grpc"]:
            extra += ["--http-port", "0"]  # the second clock reaches our engine through the HTTP front end
        # A variant's flags come last: where it repeats a flag given above, its value is the one taken.
        variant = variants.get(name)
        own = list(variant.args) if variant else []
        note = f"variant: {variant.describe()}" if variant else ""
        previous = None
        for api in apis:
            previous = YayiTarget(
                engine,
                config.model,
                extra + common + own,
                QUEUE,
                config.sample_period_s,
                api,
                shares_with=previous,
                name=name,
                note=note,
            )
            runs.append(Run(previous, True, sweep.Search(**search_args), variant=variant is not None))
    for name in baselines:
        target = baseline_target(name, targets_config, raw)
        # transformers serve cannot be told to ignore EOS: its rows say so (report.py).
        runs.append(Run(target, not isinstance(target, TransformersServeTarget), sweep.Search(**search_args)))
    bound = queue_wait_bound(config, terms)
    if bound is not None and config.overload > 0:
        for name, engine in zip(names, engines):
            if name in variants:
                continue
            extra = vllm_engine_args(targets_config) if engine == "vllm" else ["--dtype", config.dtype]
            target = YayiTarget(
                engine,
                config.model,
                extra + common + ["--max-queue-wait", f"{bound:g}"],
                QUEUE,
                config.sample_period_s,
                name=name + BOUND_SUFFIX,
                note=f"--max-queue-wait {bound:g}",
            )
            runs.append(Run(target, True, None, bound_of=name))
    return runs


class Driver:
    def __init__(self, config: CapacityConfig, built: trace.Trace, terms, out: Path) -> None:
        self.config, self.trace, self.terms, self.out = config, built, terms, out
        self.raw = out / "raw"
        self.samples = open(self.raw / "samples.jsonl", "w")
        self.steps_done = 0
        self.started = time.monotonic()

    def requests_at(self, rate: float) -> int:
        wanted = math.ceil(rate * self.config.step_seconds)
        return max(self.config.min_requests, min(self.config.max_requests, wanted))

    def step_seconds(self, rate: float) -> float:
        return self.requests_at(rate) / rate + 5.0

    def progress(self, run: Run, rate: float, phase: str, left_s: float) -> None:
        print(
            f"[capacity] {run.label}: {phase} at {rate:.3g} req/s ({self.requests_at(rate)} requests); "
            f"about {left_s / 60:.0f} min left",
            flush=True,
        )

    def step(self, run: Run, rate: float, round_no: int, phase: str) -> dict:
        schedule = self.trace.at(rate, self.requests_at(rate))
        prefix = self.raw / f"{run.label}_{phase}_{rate:.4g}_r{round_no}"
        row: dict = {"target": run.label, "phase": phase, "round": round_no, "eos_ignored": run.ignore_eos}
        try:
            with run.target.watch(prefix) as watch:
                step = asyncio.run(
                    client.run_step(run.wire(), schedule, rate, self.config.max_lag_s, self.config.request_timeout_s)
                )
        except Exception as exc:  # a server that died mid-step: this row says so, the run goes on
            row.update(offered_rps=rate, error=f"{type(exc).__name__}: {exc}"[:300], valid=False, meets=False)
            run.rows.append(row)
            return row
        row.update(sweep.summarize(step, self.terms))
        row.update(report.reading_fields(watch.reading, row, step.duration_s))
        row.update(report.server_ttft(prefix))
        for sample in step.samples:
            self.samples.write(json.dumps({"target": run.label, "phase": phase, "round": round_no, **sample.row()}))
            self.samples.write("\n")
        self.samples.flush()
        run.rows.append(row)
        self.steps_done += 1
        return row

    def search(self, runs: list[Run]) -> None:
        while True:
            todo = [(run, run.search.next_rate()) for run in runs if run.search and not run.failed]
            todo = [(run, rate) for run, rate in todo if rate is not None]
            if not todo:
                return
            # The next rate's step time for every step still ahead: a rough bound, said as "about".
            left = sum(self.step_seconds(rate) * run.search.steps_left() for run, rate in todo) * self.config.repeat
            for round_no in range(self.config.repeat):
                for run, rate in todo:
                    self.progress(run, rate, f"search round {round_no + 1}", left)
                    left -= self.step_seconds(rate)
                    self.step(run, rate, round_no, "search")
            for run, rate in todo:
                rows = [r for r in run.rows if r["phase"] == "search" and r["offered_rps"] == rate]
                if not all(r.get("valid") for r in rows):
                    lag = max((r.get("lag_p99_s") or 0) for r in rows)
                    why = rows[-1].get("error") or f"the client fell behind (lag p99 {lag:.2f} s)"
                    run.search.stop(f"stopped at {rate:.3g} req/s: {why}")
                    continue
                passed = 2 * sum(bool(r["meets"]) for r in rows) > len(rows)
                run.search.record(rate, passed)

    def overload(self, runs: list[Run], capacities: dict[str, float]) -> None:
        for round_no in range(self.config.repeat):
            for run in runs:
                capacity = capacities.get(run.bound_of or run.label)
                if run.failed or not capacity:
                    continue
                rate = capacity * self.config.overload
                self.progress(run, rate, f"{self.config.overload:g}x capacity", self.step_seconds(rate))
                row = self.step(run, rate, round_no, "overload")
                row["health_after"] = health(run.target)


def health(target) -> str:
    """The server's health right after a step past capacity: ours by the gRPC health service (SERVING or
    not), an outside server by its /health answer's HTTP code."""
    import urllib.request

    try:
        if isinstance(target, YayiTarget):
            from grpc_health.v1 import health_pb2

            status = target.server.health_status()
            return health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        with urllib.request.urlopen(target.host + "/health", timeout=10) as answer:
            return f"HTTP {answer.status}"
    except Exception as exc:  # the answer is the figure: a server that cannot say is reported so
        return f"no answer ({type(exc).__name__})"


def keep_log(run: Run, raw: Path) -> None:
    """Our server's output under raw/ as ``LABEL_server.log``, beside the peers' (what it ran with: its
    start-up lines say the engine's settings)."""
    server = getattr(run.target, "server", None) if isinstance(run.target, YayiTarget) else None
    if server is not None and server.lines:
        (raw / f"{run.label}_server.log").write_text("\n".join(server.lines) + "\n")


def start(run: Run, timeout: float) -> None:
    try:
        run.target.start(timeout)
        run.target.warm_up()
    except Exception as exc:
        run.failed = f"did not start: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        print(f"[capacity] {run.label} {run.failed}", flush=True)


def main(argv: list[str] | None = None) -> int:
    config = parse(argv)
    try:
        terms = sweep.parse_slo(config.slo)
    except ValueError as exc:
        raise SystemExit(f"capacity: error: --slo: {exc}") from None
    from engines.models import resolve_model

    model_path = str(resolve_model(config.model))
    try:
        workload = workloads.parse(config.workload, model_path, config.output_tokens)
        built = trace.build(workload, config.max_requests, config.arrival, config.burstiness, config.seed)
    except ValueError as exc:
        raise SystemExit(f"capacity: error: {exc}") from None
    folder = Report("capacity", config.out or None, "loadtest.capacity", argv)
    out = folder.dir
    (out / "raw").mkdir(exist_ok=True)
    built.save(out / "trace.jsonl")
    clocked = second_clock.wanted(config.second_clock)
    runs = make_runs(config, model_path, out / "raw", terms, clocked)
    driver = Driver(config, built, terms, out)
    searched = [run for run in runs if not run.bound_of]
    bounded = [run for run in runs if run.bound_of]
    clock_rows: list[dict] = []
    try:
        for run in searched:
            start(run, config.start_timeout_s)
        driver.search(searched)
        capacities = {run.label: c for run in searched if (c := report.capacity_of(run.rows)[0]) is not None}
        # Past capacity and on the second clock: engines and peers; a variant's question is its capacity.
        compared = [run for run in searched if not run.variant]
        driver.overload(compared, capacities)
        if clocked:
            clock_rows = second_clock.run(compared, capacities, config, terms, out / "raw", model_path, built)
        for run in searched:
            keep_log(run, out / "raw")
            run.target.stop()
        for run in bounded:
            if run.bound_of in capacities:
                start(run, config.start_timeout_s)
        driver.overload([run for run in bounded if run.bound_of in capacities], capacities)
    finally:
        for run in runs:
            keep_log(run, out / "raw")
            run.target.stop()
        driver.samples.close()
        report.write(folder, config, terms, built, runs, clock_rows)
    print(f"[capacity] report: {folder.markdown_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
