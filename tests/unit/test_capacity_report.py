"""The report's reading of rows: capacity with its spread, ratios, the verdict, the server's histogram, settings."""

from __future__ import annotations

import pytest

from loadtest.capacity import report
from loadtest.capacity.config import CapacityConfig, parse
from loadtest.measure import scrape


def row(rate, meets, round_no=0, valid=True, **extra):
    return {"phase": "search", "offered_rps": rate, "meets": meets, "round": round_no, "valid": valid, **extra}


def test_capacity_is_the_highest_pass_below_the_first_failure_with_its_spread():
    rows = [row(1, True), row(2, True), row(4, False), row(3, True), row(8, True)]  # 8 passing is noise
    rows += [row(1, True, 1), row(2, True, 1), row(4, False, 1), row(3, False, 1)]
    capacity, spread = report.capacity_of(rows)
    assert capacity == 2  # at 3 the rounds split: no majority
    assert sorted(spread) == [2, 3]


def test_invalid_steps_are_never_read_as_capacity():
    rows = [row(1, True), row(2, True, valid=False)]
    assert report.capacity_of(rows)[0] == 1
    assert report.capacity_of([row(1, False)])[0] is None


class FakeRun:
    def __init__(self, label, rows, ignore_eos=True):
        self.target = type("T", (), {"label": label})()
        self.label, self.rows, self.ignore_eos = label, rows, ignore_eos
        self.failed, self.search, self.bound_of = "", None, ""


def test_ratio_and_verdict_come_from_the_figures():
    runs = [
        FakeRun("hf-cb", [row(1, True, j_per_request=2.0), row(2, True, j_per_request=3.0), row(4, False)]),
        FakeRun("transformers-serve-matched", [row(1, True, j_per_request=4.0), row(2, False)], ignore_eos=False),
    ]
    capacities = report.capacity_table(runs)
    assert [c["capacity_rps"] for c in capacities] == [2, 1]
    assert "cannot ignore EOS" in capacities[1]["note"]
    ratios = report.ratio_table(capacities)
    assert ratios == [
        {
            "ours": "hf-cb",
            "peer": "transformers-serve-matched",
            "ours_rps": 2,
            "peer_rps": 1,
            "ratio": 2.0,
            "energy_ratio": 0.75,
        }
    ]
    text = report.verdict(capacities, ratios, "P99 TTFT ≤ 2000 ms")
    assert "hf-cb takes the most requests: 2/s" in text and "2x transformers-serve-matched's" in text
    assert "0.75x the energy per request" in text


HISTOGRAM = """# TYPE yayi_time_to_first_token_seconds histogram
yayi_time_to_first_token_seconds_bucket{{le="0.1"}} {a}
yayi_time_to_first_token_seconds_bucket{{le="1.0"}} {b}
yayi_time_to_first_token_seconds_bucket{{le="+Inf"}} {b}
yayi_time_to_first_token_seconds_count {b}
yayi_time_to_first_token_seconds_sum 1.0
"""


def test_the_servers_histogram_is_read_over_the_step_only():
    before = scrape.parse(HISTOGRAM.format(a=100, b=100))  # earlier requests, all fast
    after = scrape.parse(HISTOGRAM.format(a=100, b=110))  # the step's ten, all between 0.1 and 1 s
    name = "yayi_time_to_first_token_seconds"
    assert report.histogram_quantile(before, after, name, 0.5) == pytest.approx(0.55)
    assert report.histogram_quantile(before, before, name, 0.5) is None
    assert report.histogram_quantile(before, after, "absent", 0.5) is None


def test_settings_parse_and_refuse_bad_values(capsys):
    config = parse(["--engines", "hf-kv", "--slo", "ttft_p99=1s", "--max-lag", "0.1"])
    assert isinstance(config, CapacityConfig) and config.max_lag_s == 0.1 and config.engines == "hf-kv"
    assert parse([]).slo == "ttft_p99=2s,tpot_p99=200ms"
    for bad in (["--start-rate", "0"], ["--start-rate", "4", "--max-rate", "2"], ["--arrival", "bursty"]):
        with pytest.raises(SystemExit):
            parse(bad)
