"""python -m loadtest.capacity end to end on tiny-llama: hf-cb and a variant of it (one torch thread, as
`make tune` defines it) through gRPC, transformers serve as the real peer, a short search, the overload steps
with and without --max-queue-wait, and the report's files.  Figures are checked by their relations, never by
value: this machine's speed is not the test's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loadtest.launch.server_process import ROOT

OURS = ("hf-cb", "hf-cb-t1")
TARGETS = {*OURS, "transformers-serve-matched"}
TOLERANCE = 1.25  # achieved against sent: completions of a short step bunch up


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("capacity") / "report"
    command = [
        sys.executable,
        "-m",
        "loadtest.capacity",
        "--engines",
        "hf-cb-t1,hf-cb",
        "--variant",
        "hf-cb-t1=hf-cb --torch-threads 1",
        "--baseline",
        "transformers-serve-matched",
        "--model",
        "tiny-llama",
        "--output-tokens",
        "8",
        "--slo",
        "ttft_p99=2s,tpot_p99=500ms",
        "--step-seconds",
        "2",
        "--min-requests",
        "6",
        "--start-rate",
        "2",
        "--max-rate",
        "8",
        "--tolerance",
        "0.5",
        "--second-clock",
        "false",
        "--out",
        str(out),
    ]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=840)
    assert completed.returncode == 0, (completed.stdout[-2000:], completed.stderr[-3000:])
    return out, completed


def load(out, stem):
    return json.loads((out / f"{stem}.json").read_text())


def test_the_report_has_its_files(report):
    out, completed = report
    for name in ("capacity.md", "capacity.json", "steps.json", "steps.csv", "trace.jsonl", "raw/samples.jsonl"):
        assert (out / name).is_file(), name
    for plot in ("latency.png", "goodput.png", "pareto.png"):
        assert (out / plot).stat().st_size > 0
    text = (out / "capacity.md").read_text()
    assert "**Verdict.**" in text and "on this machine" in text
    assert "[capacity] hf-cb-t1: search round 1 at 2 req/s" in completed.stdout


def test_every_target_was_searched_on_the_same_trace(report):
    out, _ = report
    steps = load(out, "steps")
    assert {s["target"] for s in steps if s["phase"] == "search"} == TARGETS
    trace_lines = (out / "trace.jsonl").read_text().splitlines()
    prompts = {json.loads(line)["index"]: json.loads(line)["prompt"] for line in trace_lines[1:]}
    samples = [json.loads(line) for line in (out / "raw" / "samples.jsonl").read_text().splitlines()]
    # The same requests at the same rate for every target: the step at 2 req/s sent the same indices.
    first = {}
    for sample in samples:
        if sample["phase"] == "search" and sample["scheduled_s"] == 0:
            first.setdefault(sample["target"], sample["index"])
    assert set(first) == TARGETS and set(first.values()) == {0}
    assert all(s["index"] in prompts for s in samples)
    ours = [s for s in samples if s["target"] == "hf-cb-t1" and s["status"] == "ok"]
    assert ours and all(s["tokens"] == 8 for s in ours)  # exact output lengths


def test_figures_keep_their_relations(report):
    out, _ = report
    for step in load(out, "steps"):
        if not step.get("valid") or step.get("ok", 0) < 2:
            continue
        assert step["achieved_rps"] <= step["sent_rps"] * TOLERANCE, step
        assert step["goodput_rps"] <= step["achieved_rps"] + 1e-9, step
        assert 0 <= step["good_pct"] <= 100
        assert step["ttft_p50_s"] <= step["ttft_p99_s"] <= step["e2e_p99_s"] + 1e-9
        if step["target"] in OURS:
            assert step["server_ttft_p50_s"] is not None  # our server's own clock, read beside ours
        assert step["errors"] == 0, step


def test_the_variant_is_its_engine_with_its_flags_and_is_set_beside_it(report):
    out, _ = report
    capacity = {row["target"]: row for row in load(out, "capacity")}
    assert capacity["hf-cb-t1"]["note"].startswith("variant: hf-cb --torch-threads 1")
    # Its server ran the flag: its start-up line (kept under raw/, as the peers' logs are) says so.
    assert "1 torch threads" in (out / "raw" / "hf-cb-t1_server.log").read_text()
    if (os.cpu_count() or 1) > 1:  # and its engine's, at torch's own default, did not
        assert "1 torch threads" not in (out / "raw" / "hf-cb_server.log").read_text()
    ratios = {(r["ours"], r["peer"]) for r in load(out, "ratios")} if (out / "ratios.json").exists() else set()
    both = capacity["hf-cb"]["capacity_rps"] and capacity["hf-cb-t1"]["capacity_rps"]
    assert (("hf-cb-t1", "hf-cb") in ratios) == bool(both)
    # Its engine's peer is not its own: no ratio sets the variant beside transformers serve.
    assert not any(ours == "hf-cb-t1" and peer != "hf-cb" for ours, peer in ratios)


def test_capacity_is_a_rate_that_met_the_target_and_invalid_steps_are_excluded(report):
    out, _ = report
    steps = load(out, "steps")
    for row in load(out, "capacity"):
        if row["capacity_rps"] is None:
            assert row["note"], row
            continue
        at = [s for s in steps if s["target"] == row["target"] and s["offered_rps"] == row["capacity_rps"]]
        assert at and all(s["valid"] for s in at) and any(s["meets"] for s in at)
        failed_below = [
            s
            for s in steps
            if s["target"] == row["target"] and s["phase"] == "search" and s["valid"] and not s["meets"]
        ]
        assert all(s["offered_rps"] > row["capacity_rps"] for s in failed_below)


def test_past_capacity_ours_with_the_bound_refuses_rather_than_fails(report):
    out, _ = report
    capacities = {row["target"]: row["capacity_rps"] for row in load(out, "capacity") if row["capacity_rps"]}
    if not capacities:
        pytest.skip("no target met the target on this machine: nothing to overload")
    overload = load(out, "overload")
    labels = {row["target"] for row in overload}
    # Every engine and peer with a capacity, and not the variant, whose question is its capacity alone.
    assert labels >= set(capacities) - {"hf-cb-t1"} and not labels & {"hf-cb-t1", "hf-cb-t1+wait"}
    for row in overload:
        base = row["target"].removesuffix("+wait")
        assert row["offered_rps"] == pytest.approx(2 * capacities[base])
        assert row["errors"] == 0  # refusals, never errors
        ours = row["target"].removesuffix("+wait") in OURS
        assert row["health_after"] == ("SERVING" if ours else "HTTP 200"), row
        assert row["goodput_rps"] <= row["offered_rps"] * TOLERANCE


def test_the_second_clock_agrees_with_ours_on_a_server_of_known_capacity(tmp_path):
    """vllm bench serve and our sender at the same constant rate, below capacity, against the same
    in-process server (4 slots, 0.2 s): every request is good on both clocks, so the goodputs agree."""
    pytest.importorskip("vllm")
    from engines.models import resolve_model
    from loadtest.capacity import config as capacity_config
    from loadtest.capacity import driver, second_clock, sweep, trace, workloads
    from tests.unit.test_capacity_driver import SlotTarget, ThreadedServer

    settings = capacity_config.parse(
        ["--arrival", "constant", "--step-seconds", "3", "--min-requests", "30", "--output-tokens", "4"]
    )
    terms = sweep.parse_slo("ttft_p99=2s,tpot_p99=500ms")
    built = trace.build(workloads.Speed(workloads.Lengths("fixed", (4,))), 60, "constant", seed=0)
    (tmp_path / "raw").mkdir()
    with ThreadedServer(4, 0.2) as url:
        run = driver.Run(SlotTarget("slots", url), True, None)
        measuring = driver.Driver(settings, built, terms, tmp_path)
        measuring.step(run, 10.0, 0, "search")
        measuring.samples.close()
        rows = second_clock.run(
            [run], {"slots": 10.0}, settings, terms, tmp_path / "raw", str(resolve_model("tiny-llama")), built
        )
    assert len(rows) == 1, rows
    row = rows[0]
    assert "note" not in row, row
    assert row["agree"], row


def test_grpc_calls_past_one_connections_stream_limit_go_out_on_more_connections():
    """A server that lets one connection hold 2 calls (--max-concurrent-streams 2) refuses a third stream on it
    (RST_STREAM REFUSED_STREAM): 6 calls at once through the sender all complete, over 3 connections."""
    import asyncio

    from loadtest.capacity import client, trace
    from loadtest.launch.server_process import ServerProcess
    from tests.helpers.servers import TINY_KV

    server = ServerProcess(*TINY_KV, "--max-concurrent-streams", "2", "--max-concurrency", "6").wait_ready()
    try:
        wire = client.GrpcWire(server.address, streams_per_connection=2)

        async def main():
            await wire.open()
            try:

                async def one(index):
                    request = trace.Request(index, 0.0, "Tell me a story.", 200)
                    return sum([n async for n in wire.stream(request)])

                return await asyncio.gather(*(one(i) for i in range(6)))
            finally:
                await wire.close()

        assert asyncio.run(main()) == [200] * 6
        assert len(wire.channels) == 3
    finally:
        server.stop()
