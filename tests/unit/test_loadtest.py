"""The measuring harness's own arithmetic, without a server: percentiles, the stream clock, the
/metrics parser, report folders and cells, and vLLM's rows beside vLLM's own server."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest

from loadtest.compare.report import baseline_comparison, table_cells
from loadtest.launch.server_process import ROOT
from loadtest.measure import scrape
from loadtest.measure.report_folder import default_out
from loadtest.measure.stream_clock import StreamClock
from loadtest.measure.token_stats import CUT, OK, RequestSample, percentile, summarize
from server.grpc.wire import pb


def test_percentile_and_summary_from_samples():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0], 100) == 2.0 and math.isnan(percentile([], 50))
    samples = [
        RequestSample(started=100.0, duration_s=2.0, tokens=10, ttft_s=0.5, itl_s=[0.1] * 9),
        RequestSample(started=101.0, duration_s=3.0, tokens=20, ttft_s=1.0, itl_s=[0.2] * 19),
        RequestSample(started=102.0, duration_s=0.1, tokens=0, status="INVALID_ARGUMENT"),
        RequestSample(started=103.0, duration_s=1.0, tokens=4, status=CUT, ttft_s=0.2),
    ]
    summary = summarize(samples, users=2)
    assert summary["output_tokens"] == 34 and summary["duration_s"] == 4.0  # 100.0 to 104.0
    assert summary["output_tokens_per_s"] == pytest.approx(34 / 4)
    assert summary["requests_ok"] == 2 and summary["requests_cut"] == 1
    assert summary["failures_by_status"] == "INVALID_ARGUMENT=1"
    assert summary["ttft_p50_ms"] == pytest.approx(750)  # the cut request's TTFT is left out
    assert summary["per_user_tokens_per_s"] == pytest.approx((10 / 2 + 20 / 3) / 2)
    assert summary["e2e_p99_ms"] == pytest.approx(2990)
    assert all(s.status in (OK, CUT, "INVALID_ARGUMENT") for s in samples)


def test_stream_clock_reads_a_grpc_stream_outside_locust():
    # The benchmarks' and scripts' TTFT: the same clock as the Locust users', fed chunk by chunk.
    chunks = [
        pb.GenerateChunk(token_ids=[1, 2]),
        pb.GenerateChunk(token_ids=[3]),
        pb.GenerateChunk(finish_reason="length", usage=pb.Usage(completion_tokens=3)),
    ]
    sample = StreamClock().read(iter(chunks))
    assert sample.status == OK and sample.tokens == 3 and sample.completion_tokens == 3
    assert 0 <= sample.ttft_s <= sample.duration_s and len(sample.itl_s) == 1


def test_scrape_sums_series_over_labels():
    body = (
        "# TYPE yayi_requests counter\n"
        'yayi_requests_total{engine="hf-kv",status="OK"} 3\n'
        'yayi_requests_total{engine="vllm",status="OK"} 2\n'
        'yayi_requests_total{engine="hf-kv",status="CANCELLED"} 1\n'
    )
    samples = scrape.parse(body)
    assert scrape.by_label(samples, "yayi_requests_total", "status") == {"OK": 5.0, "CANCELLED": 1.0}
    assert scrape.total(samples, "yayi_requests_total", engine="hf-kv") == 4.0
    assert scrape.total(samples, "yayi_energy_joules_total") is None  # absent is not zero


def test_every_report_folder_follows_one_rule():
    out = default_out("speed")
    assert out.parent == ROOT / "reports" and re.fullmatch(r"speed-\d{8}-\d{6}", out.name)


def test_report_cells_say_what_a_cpu_measures():
    row = {
        "model": "m",
        "engine": "hf-kv",
        "users": 4,
        "speed_tokens_per_s": 12.34,
        "mem_mb": 900.4,
        "util_pct": 48.2,
        "util_source": "CPU",
        "use_cache": True,
        "power_w": None,
        "power_source": "no RAPL",
        "notes": "",
        "requests_per_s": 0.1,
        "ttft_p50_ms": 1,
        "ttft_p95_ms": 2,
        "itl_p50_ms": 3,
        "e2e_p95_ms": 4,
        "errors": 0,
        "j_per_token": None,
        "pct_of_bound": 12.5,
    }
    cells = table_cells(row)
    assert cells[:7] == ["m", "hf-kv", "12.3", "900", "CPU 48%", "TRUE", "n/a (no RAPL)"]
    assert cells[-1] == "12.5%" and cells[-2] == "n/a"
    gpu = table_cells({**row, "util_source": "GPU", "power_w": 250.0, "power_source": "NVML"})
    assert gpu[4:7] == ["48", "TRUE", "250.0"]


def test_vllm_rows_are_set_beside_vllms_own_server():
    def row(engine, users, speed, ttft):
        return {"engine": engine, "users": users, "speed_tokens_per_s": speed, "ttft_p50_ms": ttft}

    rows = [
        row("vllm", 0, None, None),
        row("vllm", 1, 30.0, 50.0),
        row("vllm", 4, 120.0, 80.0),
        row("vllm-openai", 1, 25.0, 60.0),
        row("vllm-openai", 4, 150.0, 70.0),
        row("hf-kv", 1, 18.0, 90.0),
    ]
    versus = baseline_comparison(rows)
    assert [(v["users"], round(v["ratio"], 2), v["ttft_ours"], v["ttft_theirs"]) for v in versus] == [
        (1, 1.2, 50.0, 60.0),
        (4, 0.8, 80.0, 70.0),
    ]
    # Any pair of rows: hf-cb against hf-kv has one point in common.
    rows.append(row("hf-cb", 1, 36.0, 45.0))
    assert [(v["users"], v["ratio"]) for v in baseline_comparison(rows, "hf-cb", "hf-kv")] == [(1, 2.0)]


def test_a_hung_outside_client_is_killed_with_its_workers(tmp_path):
    """guidellm's deadlock leaves spawned workers behind: the watchdog ends the whole session."""
    from loadtest.compare import second_clock

    marker = tmp_path / "child.pid"
    argv = ["bash", "-c", f"sleep 60 & echo $! > {marker}; wait"]
    with open(tmp_path / "log", "w") as log:
        assert second_clock._run_watched(argv, log, dict(os.environ), tmp_path, timeout=1) is None
        assert second_clock._run_watched(["true"], log, dict(os.environ), tmp_path, timeout=5) == 0
    child = int(marker.read_text())
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    assert "without a result" in (tmp_path / "log").read_text()
