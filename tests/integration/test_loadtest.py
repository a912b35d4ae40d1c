"""Real Locust against a real server, and the comparison driver end to end on tiny-llama."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from engines.hf_cb.engine import default_cache_plan
from loadtest.compare.locust_run import LoadSpec, locust_command, run_locust
from loadtest.launch.server_process import ROOT, ServerProcess
from loadtest.measure.token_stats import read_summary_csv
from tests.helpers.observe import metric

SPEED = ROOT / "loadtest" / "speed.py"


def generated_tokens(server) -> float:
    return metric(server, "yayi_generation_tokens_total")


def compare_command(out, *targets: str, probe_seconds: str, max_new_tokens: int = 16) -> list[str]:
    """loadtest.compare.driver on tiny-llama, as short as a full report allows: 2 users for 4 s, 16 tokens each."""
    return [
        sys.executable,
        "-m",
        "loadtest.compare.driver",
        *targets,
        "--model",
        "tiny-llama",
        "--users",
        "2",
        "--duration",
        "4s",
        "--max-new-tokens",
        str(max_new_tokens),
        "--idle-seconds",
        "1",
        "--stop-timeout",
        "30",
        "--probe-seconds",
        probe_seconds,
        "--out",
        str(out),
    ]


def locust_stats(prefix) -> dict[str, dict]:
    with open(f"{prefix}_stats.csv", newline="") as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


def test_headless_locust_against_a_real_server(tiny_server, tmp_path):
    prefix = tmp_path / "run"
    before = generated_tokens(tiny_server)
    summary = run_locust(
        SPEED, tiny_server.address, LoadSpec(users=2, duration_s=4, max_new_tokens=12, stop_timeout_s=30), prefix
    )
    assert summary["requests_ok"] > 0 and summary["requests_failed"] == 0 and summary["requests_cut"] == 0
    assert summary["output_tokens_per_s"] > 0 and summary["ttft_p50_ms"] > 0 and summary["itl_p50_ms"] > 0
    # ignore_eos: every request streamed exactly max_new_tokens token ids.
    assert summary["output_tokens"] == 12 * summary["requests_ok"]
    # With a stop timeout nobody is cut, so the client saw every token the server counted.
    assert generated_tokens(tiny_server) - before == summary["output_tokens"]
    stats = locust_stats(prefix)
    # Locust writes its own CSV before the stop timeout's stragglers finish, so it may hold fewer.
    assert 0 < int(stats["GenerateStream"]["Request Count"]) <= summary["requests_ok"]
    assert int(stats["GenerateStream"]["Failure Count"]) == 0
    assert int(stats["GenerateStream TTFT"]["Request Count"]) == int(stats["GenerateStream"]["Request Count"])
    for name in ("failures", "exceptions", "stats_history"):
        assert (tmp_path / f"run_{name}.csv").exists()


def test_failures_are_counted_with_the_status_code(tiny_server, tmp_path):
    too_long = tmp_path / "prompts.txt"
    too_long.write_text("word " * 5000 + "\n")  # far past tiny-llama's 1024-token context
    prefix = tmp_path / "fail"
    summary = run_locust(
        SPEED, tiny_server.address, LoadSpec(users=1, duration_s=3, prompts_file=str(too_long)), prefix
    )
    assert summary["requests_ok"] == 0 and summary["requests_failed"] > 0
    assert summary["failures_by_status"] == f"INVALID_ARGUMENT={summary['requests_failed']}"
    with open(f"{prefix}_failures.csv", newline="") as handle:
        failures = list(csv.DictReader(handle))
    assert failures and failures[0]["Name"] == "GenerateStream [INVALID_ARGUMENT]"
    assert "context" in failures[0]["Error"]
    assert tiny_server.generate("still serving", max_new_tokens=2).usage.completion_tokens == 2


@pytest.mark.slow
def test_distributed_mode_gathers_every_workers_samples(tiny_server, tmp_path):
    prefix = tmp_path / "dist"
    # Requests long enough (about a second each on tiny-llama) that the run ends with one in flight
    # on one worker and one queued behind it on the other: each worker needs longer than Locust's
    # fixed half second at quit to ship its last samples.
    load = LoadSpec(users=2, duration_s=5, max_new_tokens=512, stop_timeout_s=30, processes=2)
    before = generated_tokens(tiny_server)
    completed = subprocess.run(
        locust_command(SPEED, tiny_server.address, load, prefix), capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert "worker" in completed.stderr.lower()  # it really ran as a master with workers
    summary = read_summary_csv(f"{prefix}_tokens.csv")
    assert summary["requests_ok"] > 0
    # The master's summary holds what both workers' users received, no more, no less.
    assert generated_tokens(tiny_server) - before == summary["output_tokens"] == 512 * summary["requests_ok"]


@pytest.mark.slow
def test_compare_driver_writes_a_complete_report(tmp_path):
    out = tmp_path / "report"
    # A variant of hf-kv whose flags name no certificate: yayi-serve's parser takes them, its start does not.
    broken = "hf-kv-tls=hf-kv --tls-cert /no/such.pem --tls-key /no/such.pem"
    command = compare_command(out, "--engines", "hf-kv,hf-eager,hf-kv-tls", "--variant", broken, probe_seconds="0.4")
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400)
    # A server that cannot start makes the exit status 1, but the others still have their rows.
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "step 2/" in completed.stderr and "hf-eager" in completed.stderr and "min left" in completed.stderr
    for name in ("speed.md", "speed.csv", "speed.json", "tokens_per_s.png", "ttft_p95.png", "memory.png"):
        assert (out / name).stat().st_size > 0, name
    rows = json.loads((out / "speed.json").read_text())["rows"]
    assert [(r["engine"], r["users"]) for r in rows] == [
        ("hf-kv", 0),
        ("hf-kv", 2),
        ("hf-eager", 0),
        ("hf-eager", 2),
        ("hf-kv-tls", 0),
    ]
    # The variant's own flags reached its server, and its row and raw files carry its label.
    assert "--tls-cert /no/such.pem: No such file or directory" in rows[-1]["notes"] and rows[-1]["failed"]
    assert (out / "raw" / "hf-kv-tls_failure.txt").exists()
    for row in rows[1], rows[3]:
        assert row["speed_tokens_per_s"] > 0 and row["errors"] == 0 and row["requests_ok"] > 0
        # Every token the client counted is one the server's own counter counted.
        assert row["client_tokens"] == row["server_tokens"] == 16 * row["requests_ok"]
        assert row["mem_mb"] > 100 and 0 < row["util_pct"] <= 100 and 0 < row["pct_of_bound"] < 100
        assert (out / f"{row['raw']}_stats.csv").exists() and (out / f"{row['raw']}_metrics_after.txt").exists()
    assert rows[0]["use_cache"] is True and rows[2]["use_cache"] is False
    with open(out / "speed.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    table = (out / "speed.md").read_text()
    assert "| Model | Engine | Speed (tokens/s) | Mem (MB) | GPU-UTL (%) | use_cache | Pwr_usg (W) | Notes |" in table
    assert "idle (空载)" in table and "GB/s" in table


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_openai_baseline_is_measured_the_same_way(tmp_path):
    pytest.importorskip("vllm", reason="vllm is installed by `make venv`; this skip only shows where it is not")
    out = tmp_path / "baseline"
    command = compare_command(
        out, "--engines", "", "--baseline", "vllm-openai", "--baseline-args=--enforce-eager", probe_seconds="0"
    )
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = json.loads((out / "speed.json").read_text())["rows"]
    assert [(r["engine"], r["users"]) for r in rows] == [("vllm-openai", 0), ("vllm-openai", 2)]
    loaded = rows[1]
    assert loaded["errors"] == 0 and loaded["requests_ok"] > 0 and loaded["speed_tokens_per_s"] > 0
    # Token counts from the continuous usage statistics agree with vLLM's own counter.
    assert loaded["client_tokens"] == loaded["server_tokens"] == 16 * loaded["requests_ok"]
    assert loaded["mem_mb"] > 100 and loaded["ttft_p50_ms"] > 0


@pytest.mark.slow
def test_transformers_serve_baseline_is_measured_the_same_way(tmp_path):
    out, most = tmp_path / "baseline", 32
    command = compare_command(
        out, "--engines", "", "--baseline", "transformers-serve-matched", probe_seconds="0", max_new_tokens=most
    )
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((out / "speed.json").read_text())
    rows = report["rows"]
    assert [(r["engine"], r["users"]) for r in rows] == [
        ("transformers-serve-matched", 0),
        ("transformers-serve-matched", 2),
    ]
    loaded = rows[1]
    # No request refused: the load sent no ignore_eos, which transformers serve answers with 422.
    assert loaded["errors"] == 0 and loaded["requests_ok"] > 0 and loaded["speed_tokens_per_s"] > 0
    assert loaded["requests_ok"] <= loaded["client_tokens"] <= most * loaded["requests_ok"]
    # Usage comes only with the last chunk: tokens are counted as their text arrives, or the
    # first token would be timed at the end of the request.
    assert loaded["ttft_p50_ms"] < loaded["e2e_p50_ms"] / 2
    assert loaded["attention"] == "paged (transformers' default)" and loaded["dtype"] == "float32"
    # It ran with hf-cb's KV cache, and the report says the load honoured EOS for it.
    plan = default_cache_plan("tiny-llama", "float32")
    started = (out / "raw" / "transformers-serve-matched_server.log").read_text().splitlines()[0]
    assert " serve " in started and "--continuous-batching" in started
    assert f"--cb-num-blocks {plan.num_blocks} --cb-block-size {plan.block_size}" in started
    assert any("ending at EOS" in note for note in report["context"]["column_notes"])


@pytest.mark.slow
def test_many_users_queued_behind_one_slot_still_receive_their_streams(tmp_path):
    # The case that once stalled every stream of a Locust process: more users than the engine
    # runs at once, each request long enough that most users wait with nothing to read.
    server = ServerProcess(
        "--engine", "hf-kv", "--model", "tiny-llama", "--max-concurrency", "1", "--max-queue", "64"
    ).wait_ready()
    try:
        before = generated_tokens(server)
        summary = run_locust(
            # 15 s: on an oversubscribed machine one 200-token request alone can take several seconds.
            SPEED,
            server.address,
            LoadSpec(users=16, duration_s=15, max_new_tokens=200),
            tmp_path / "queued",
        )
        generated = generated_tokens(server) - before
    finally:
        server.stop()
    assert summary["requests_ok"] >= 1 and summary["requests_failed"] == 0
    # Whatever the server generated reached the client, but for the few tokens of the one
    # request cut at the end (generated after its client left).
    assert summary["output_tokens"] >= 0.9 * generated > 0
