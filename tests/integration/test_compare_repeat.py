"""yayi-compare --repeat 2 --second-client guidellm end to end: real servers (hf-cb and transformers serve
left to its cache defaults), real Locust, real guidellm, on tiny-llama, a few seconds per step."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from loadtest.compare import second_clock
from loadtest.launch.server_process import ROOT

pytestmark = pytest.mark.slow

PAIR = ("hf-cb", "transformers-serve-defaults")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if second_clock.executable() is None:
        subprocess.run([sys.executable, "-m", "loadtest.compare.second_clock", "install"], check=True, timeout=600)
    out = tmp_path_factory.mktemp("repeat") / "report"
    command = [
        sys.executable,
        "-m",
        "loadtest.compare.driver",
        "--engines",
        "hf-cb",
        "--baseline",
        "transformers-serve-defaults",
        # Its default cache on a CPU is 90 % of the machine's memory: a test takes 6 %. 2 % is too little:
        # its default 8192 tokens per step need about 1 GB of attention masks before any cache block.
        "--transformers-serve-defaults-args=--cb-max-memory-percent 0.06",
        "--model",
        "tiny-llama",
        "--users",
        "2",
        "--duration",
        "3s",
        "--max-new-tokens",
        "16",
        "--idle-seconds",
        "1",
        "--stop-timeout",
        "30",
        "--probe-seconds",
        "0",
        "--repeat",
        "2",
        "--second-client",
        "guidellm",
        "--out",
        str(out),
    ]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out, json.loads((out / "speed.json").read_text()), completed


def test_repeat_interleaves_the_targets_round_by_round(report):
    out, data, completed = report
    steps = sorted(data["rounds"] + data["clock_rounds"], key=lambda r: r["seq"])
    # Round 1 of both servers under Locust, then under guidellm, then round 2: A B A B on each clock.
    assert [(r["clock"], r["engine"], r["round"]) for r in steps] == [
        ("locust", PAIR[0], 1),
        ("locust", PAIR[1], 1),
        ("guidellm", PAIR[0], 1),
        ("guidellm", PAIR[1], 1),
        ("locust", PAIR[0], 2),
        ("locust", PAIR[1], 2),
        ("guidellm", PAIR[0], 2),
        ("guidellm", PAIR[1], 2),
    ]
    assert data["context"]["groups"] == [list(PAIR)] and "up together" in data["context"]["together"]
    # Both servers were started once, up across the rounds.
    assert completed.stderr.count("starting the server") == 2
    for r in steps:
        assert r["requests_ok"] > 0, r
    for r in data["rounds"]:
        assert (out / f"{r['raw']}_tokens.csv").exists() and r["raw"].endswith(f"_r{r['round']}")
    for r in data["clock_rounds"]:
        assert (out / f"{r['raw']}_guidellm.json").exists() and r["requests_failed"] == 0


def test_rows_and_ratios_are_the_rounds_medians(report):
    out, data, _ = report
    rounds = {(r["engine"], r["round"]): r for r in data["rounds"]}
    rows = {r["engine"]: r for r in data["rows"] if r["users"] == 2}
    for engine in PAIR:
        speeds = [rounds[(engine, n)]["speed_tokens_per_s"] for n in (1, 2)]
        row = rows[engine]
        assert row["speed_tokens_per_s"] == pytest.approx(statistics.median(speeds))
        assert (row["speed_min"], row["speed_max"]) == (min(speeds), max(speeds)) and row["rounds"] == 2
        assert row["client_tokens"] == sum(rounds[(engine, n)]["client_tokens"] for n in (1, 2))
    ratios = [rounds[(PAIR[0], n)]["speed_tokens_per_s"] / rounds[(PAIR[1], n)]["speed_tokens_per_s"] for n in (1, 2)]
    text = (out / "speed.md").read_text()
    assert f"| {statistics.median(ratios):.2f} | {min(ratios):.2f}–{max(ratios):.2f} | 2 |" in text
    assert f"{row['speed_tokens_per_s']:.1f} ({row['speed_min']:.1f}–{row['speed_max']:.1f})" in text
    # The cache was left to transformers serve: no hf-cb plan on its command line.
    started = (out / "raw" / "transformers-serve-defaults_server.log").read_text().splitlines()[0]
    assert "--continuous-batching" in started and "--cb-num-blocks" not in started


def test_the_second_clocks_figures_are_in_the_report(report):
    out, data, _ = report
    clock = {(r["engine"], r["round"]): r for r in data["clock_rounds"]}
    assert all(clock[(engine, n)]["speed_tokens_per_s"] > 0 for engine in PAIR for n in (1, 2))
    ratios = [clock[(PAIR[0], n)]["speed_tokens_per_s"] / clock[(PAIR[1], n)]["speed_tokens_per_s"] for n in (1, 2)]
    text = (out / "speed.md").read_text()
    assert "## Second clock: guidellm" in text and "| guidellm ratio | clocks |" in text
    assert f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})" in text
    speed = statistics.median(clock[(PAIR[0], n)]["speed_tokens_per_s"] for n in (1, 2))
    assert f"| {PAIR[0]} | 2 | {speed:.1f} (" in text
