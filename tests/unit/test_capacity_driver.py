"""The driver's search, overload and report against in-process servers of known capacity (no model):
the loop a `make capacity` run takes, its rows and its files."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading

import pytest

from loadtest.capacity import config as capacity_config
from loadtest.capacity import driver, report, sweep, trace, workloads
from loadtest.compare.targets import Reading
from loadtest.measure.report_folder import Report
from tests.unit.test_capacity_client import SlotServer


class ThreadedServer:
    """A SlotServer on its own event loop in a thread, as a real server is in its own process."""

    def __init__(self, slots: int, service_s: float) -> None:
        self.server = SlotServer(slots, service_s)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self.server.__aenter__(), self.loop).result(10)

    def __exit__(self, *_) -> None:
        asyncio.run_coroutine_threadsafe(self.server.__aexit__(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class SlotTarget:
    """What the driver asks of a target (loadtest.compare.targets' Target), for a SlotServer."""

    fresh_connection = False

    def __init__(self, label: str, url: str) -> None:
        self.label, self.openai_url, self.served_name = label, url, "m"
        self.stopped = False

    @contextlib.contextmanager
    def watch(self, raw_prefix):
        watch = type("Watch", (), {"reading": Reading(memory_peak_bytes=2**20, energy_j=None)})()
        yield watch

    def stop(self) -> None:
        self.stopped = True


@pytest.fixture
def settings(tmp_path):
    return capacity_config.parse(
        ["--step-seconds", "0.8", "--min-requests", "12", "--max-requests", "48", "--start-rate", "10"]
        + ["--max-rate", "80", "--tolerance", "0.1", "--max-lag", "0.05", "--arrival", "constant"]
        + ["--out", str(tmp_path / "report")]
    )


def test_the_driver_finds_each_capacity_interleaved_and_writes_the_report(settings, tmp_path):
    terms = sweep.parse_slo("ttft_p99=100ms")
    built = trace.build(workloads.Speed(workloads.Lengths("fixed", (4,))), 48, "constant", seed=0)
    folder = Report("capacity", settings.out, "loadtest.capacity", [])
    (folder.dir / "raw").mkdir()
    with ThreadedServer(4, 0.2) as small, ThreadedServer(8, 0.2) as large:
        runs = [
            driver.Run(SlotTarget("small", small), True, sweep.Search(10, 2, 80, 0.1)),
            driver.Run(SlotTarget("large", large), True, sweep.Search(10, 2, 80, 0.1)),
        ]
        run_driver = driver.Driver(settings, built, terms, folder.dir)
        run_driver.search(runs)
        capacities = {run.label: report.capacity_of(run.rows)[0] for run in runs}
        run_driver.overload(runs, capacities)
        run_driver.samples.close()
    report.write(folder, settings, terms, built, runs, [])
    # 4 and 8 slots of 0.2 s: 20 and 40 requests/s.
    assert capacities["small"] == pytest.approx(20, rel=0.1)
    assert capacities["large"] == pytest.approx(40, rel=0.1)
    # Interleaved: the first rate of both before the second rate of either.
    order = [(row["target"], row["offered_rps"]) for run in runs for row in run.rows]
    assert ("small", 10) in order and ("large", 10) in order
    for name in ("capacity.md", "capacity.json", "steps.json", "overload.json", "latency.png", "goodput.png"):
        assert (folder.dir / name).is_file(), name
    overload = json.loads((folder.dir / "overload.json").read_text())
    assert {row["target"] for row in overload} == {"small", "large"}
    for row in overload:
        assert row["offered_rps"] == pytest.approx(2 * capacities[row["target"]])
        assert row["goodput_rps"] < row["offered_rps"]
    text = (folder.dir / "capacity.md").read_text()
    assert "large takes the most requests" in text
    samples = (folder.dir / "raw" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == sum(row["requests"] for run in runs for row in run.rows)


def test_the_second_clock_replays_our_prompts_and_counts_goodput_as_ours(tmp_path):
    from loadtest.capacity import second_clock, sweep, trace
    from loadtest.capacity.config import parse

    built = trace.Trace(
        tuple(trace.Request(i, float(i), f"prompt {i}", 8 + i) for i in range(5)), "gamma", 4.0, 3, "speed"
    )
    assert second_clock.dataset_rows(built, 2) == [
        {"prompt": "prompt 0", "output_tokens": 8},
        {"prompt": "prompt 1", "output_tokens": 9},
    ]
    config = parse(["--arrival", "gamma", "--burstiness", "4", "--seed", "3"])
    terms = sweep.parse_slo("ttft_p99=2s,tpot_p99=200ms")
    args = second_clock.bench_args("http://h/v1", "m", "/model", tmp_path / "d.jsonl", 2, 1.5, config, terms)
    flags = dict(zip(args[::2], args[1::2], strict=False))
    assert flags["--dataset-name"] == "custom" and flags["--custom-output-len"] == "-1"
    assert "--skip-chat-template" in args and "--disable-shuffle" in args
    assert args[args.index("--request-rate") + 1] == "1.5" and args[args.index("--burstiness") + 1] == "4"
    assert args[args.index("--goodput") + 1 : args.index("--goodput") + 3] == ["ttft:2000", "tpot:200"]
    # 9 of 10 good over a 12 s run on their clock; 80 % on ours: goodput 0.9 and 0.8 of the rate.
    theirs = {"completed": 10, "failed": 0, "duration": 12.0, "request_goodput": 9 / 12.0, "p99_ttft_ms": 900.0}
    row = second_clock.compare([{"good_pct": 80.0, "goodput_run_rps": 0.7}], theirs, 2.0)
    assert row["vllm_bench_good_pct"] == pytest.approx(90.0) and row["ours_good_pct"] == 80.0
    assert row["vllm_bench_goodput_rps"] == pytest.approx(1.8) and row["ours_goodput_rps"] == pytest.approx(1.6)
    assert row["difference"] == pytest.approx(0.125) and row["agree"] is False
    assert second_clock.compare([{"good_pct": 90.0, "goodput_run_rps": 0.7}], theirs, 2.0)["agree"] is True
