"""What every speed locustfile shares: the load's command-line options, and the collector that
gathers each request's sample (shipped to the master in distributed mode) and writes the
serving-benchmark summary at the end.  ``install()`` wires it to Locust's events."""

from __future__ import annotations

import time

import gevent
from locust.rpc import Message
from locust.runners import MasterRunner, WorkerRunner

from loadtest.measure.token_stats import RequestSample, format_summary, summarize, write_summary_csv

_WIRE_KEY = "yayi_samples"


def flag(value: str) -> bool:
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def add_load_arguments(parser) -> None:
    group = parser.add_argument_group("yayi-serve speed test")
    # The default prompts are the inference log's three (docs/design.md), from loadtest/measure/prompts.py.
    group.add_argument(
        "--prompts-file", default="", help="one prompt per line (default: the inference log's three speed prompts)"
    )
    group.add_argument("--max-new-tokens", type=int, default=128)
    group.add_argument(
        "--ignore-eos",
        type=flag,
        default=True,
        help="true: every request generates exactly --max-new-tokens (default true)",
    )
    group.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    group.add_argument(
        "--chat-template",
        type=flag,
        default=False,
        help="wrap each prompt in the model's chat template (default false)",
    )
    group.add_argument(
        "--grpc-channels",
        type=int,
        default=1,
        help="gRPC connections per Locust process, users spread over them (default 1)",
    )
    group.add_argument("--request-timeout", type=float, default=600.0, help="deadline per request, seconds")
    group.add_argument(
        "--summary-csv",
        default="",
        help="where to write the summary (default PREFIX_tokens.csv when --csv PREFIX is given)",
    )
    return group


class SampleCollector:
    """All samples of the current test, kept where measured (local run) or shipped to the master
    (distributed run), which alone summarises."""

    def __init__(self) -> None:
        self.samples: list[RequestSample] = []
        self.unsent: list[RequestSample] = []
        self.summarised_count = -1

    def reset(self, **_) -> None:
        self.samples.clear()
        self.unsent.clear()
        self.summarised_count = -1

    def add(self, sample: RequestSample) -> None:
        self.samples.append(sample)
        self.unsent.append(sample)

    def ship(self, client_id, data) -> None:
        data[_WIRE_KEY] = [sample.to_wire() for sample in self.unsent]
        self.unsent.clear()

    def receive(self, client_id, data) -> None:
        self.samples.extend(RequestSample.from_wire(item) for item in data.get(_WIRE_KEY, ()))

    def on_test_stop(self, environment, **_) -> None:
        # A worker ships its last samples in its final report at quit; a master reports at
        # quitting, once every worker has sent that report (wait_for_workers_at_quit).
        if not isinstance(environment.runner, (MasterRunner, WorkerRunner)):
            self.report(environment)

    def on_quitting(self, environment, **_) -> None:
        if not isinstance(environment.runner, WorkerRunner):
            self.report(environment)

    def report(self, environment) -> None:
        if self.summarised_count == len(self.samples):
            return
        self.summarised_count = len(self.samples)
        options = environment.parsed_options
        users = getattr(environment.runner, "target_user_count", None) or getattr(options, "num_users", None)
        summary = summarize(self.samples, users=users)
        print("\nyayi-serve speed test\n" + format_summary(summary), flush=True)
        path = (
            options.summary_csv
            if options and options.summary_csv
            else (f"{options.csv_prefix}_tokens.csv" if options and options.csv_prefix else "")
        )
        if path:
            write_summary_csv(summary, path)


def wait_for_workers_at_quit(environment, runner=None, **_) -> None:
    """Make a master's quit wait for every worker's last samples instead of a fixed half second.

    A headless run with --run-time ends with the master's ``quit()``: it sends "quit" to each
    worker and gives them 0.5 s for a final report (locust/runners.py ``MasterRunner.quit``).  A
    worker first stops its users, which may take up to --stop-timeout while their last requests
    finish, so a loaded worker's last samples arrived after the master had summarised.  Each
    worker sends "quit" back after its final report, and the master then drops it from
    ``clients``; this quit waits for that, bounded by the stop timeout and a margin."""
    if not isinstance(runner, MasterRunner):
        return

    def quit() -> None:
        runner.stop(send_stop_to_client=False)
        for client in runner.clients.all:
            runner.server.send_to_client(Message("quit", None, client.id))
        deadline = time.monotonic() + (environment.stop_timeout or 0) + 10
        while runner.clients.all and time.monotonic() < deadline:
            gevent.sleep(0.05)
        runner.greenlet.kill(block=True)

    runner.quit = quit


def install(events, add_arguments=None) -> SampleCollector:
    collector = SampleCollector()

    def arguments(parser) -> None:
        group = add_load_arguments(parser)
        if add_arguments:
            add_arguments(group)

    events.init_command_line_parser.add_listener(arguments)
    events.init.add_listener(wait_for_workers_at_quit)
    events.test_start.add_listener(collector.reset)
    events.report_to_master.add_listener(collector.ship)
    events.worker_report.add_listener(collector.receive)
    events.test_stop.add_listener(collector.on_test_stop)
    events.quitting.add_listener(collector.on_quitting)
    return collector
