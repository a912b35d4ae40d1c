"""What every speed locustfile shares: the load's command-line options, and the collector that
gathers each request's sample (shipped to the master in distributed mode) and writes the
serving-benchmark summary at the end.  ``install()`` wires it to Locust's events."""

from __future__ import annotations

from locust.runners import MasterRunner, WorkerRunner

from loadtest.token_stats import RequestSample, format_summary, summarize, write_summary_csv

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
    # The default prompts are the inference log's three (docs/design.md), from loadtest/prompts.py.
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
        if isinstance(environment.runner, WorkerRunner):
            # Ship the last samples now, ahead of this worker's "stopped" message: otherwise they
            # wait for the final report at quit, which a busy master gives only half a second.
            environment.runner._send_stats()
        elif not isinstance(environment.runner, MasterRunner):
            self.report(environment)
        # A master reports at quitting, once every worker has said it stopped.

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


def install(events, add_arguments=None) -> SampleCollector:
    collector = SampleCollector()

    def arguments(parser) -> None:
        group = add_load_arguments(parser)
        if add_arguments:
            add_arguments(group)

    events.init_command_line_parser.add_listener(arguments)
    events.test_start.add_listener(collector.reset)
    events.report_to_master.add_listener(collector.ship)
    events.worker_report.add_listener(collector.receive)
    events.test_stop.add_listener(collector.on_test_stop)
    events.quitting.add_listener(collector.on_quitting)
    return collector
