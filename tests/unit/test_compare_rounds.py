"""yayi-compare's rounds without a server: medians and ranges from made-up rounds, what a ratio reads
as, the second clock's agreement, which servers are up together, guidellm's command and summary."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from loadtest.compare.driver import (
    Progress,
    build_parser,
    clock_pairs,
    parse_args,
    printed_summary,
    run_plan,
    second_clock,
)
from loadtest.compare.report import VERSUS, markdown_report, ratio_cautions, ratio_rows
from loadtest.compare.rounds import Spread, aggregate, aggregate_all, clocks_differ, round_ratios
from loadtest.compare.schedule import GiB, components, plan_groups
from loadtest.compare.targets import (
    BASELINES,
    TransformersServeDefaultsTarget,
    VLLMServerTarget,
    default_cache_share,
    parse_baselines,
)


def round_row(engine, users, number, seq, speed, **more):
    return {
        "model": "m",
        "engine": engine,
        "users": users,
        "round": number,
        "seq": seq,
        "clock": "locust",
        "speed_tokens_per_s": speed,
        "ttft_p50_ms": 10.0 * number,
        "mem_mb": 100.0 + number,
        "errors": 0,
        "requests_ok": 5,
        "client_tokens": 80,
        "server_tokens": 80,
        "raw": f"raw/{engine}_u{users}_r{number}",
        "notes": "float32",
        **more,
    }


# Three rounds of A (ours) and B (theirs) at 4 users, interleaved: A B A B A B.
ROUNDS = [
    round_row("A", 4, 1, 1, 103.0),
    round_row("B", 4, 1, 2, 100.0),
    round_row("A", 4, 2, 3, 90.0),
    round_row("B", 4, 2, 4, 100.0),
    round_row("A", 4, 3, 5, 115.0),
    round_row("B", 4, 3, 6, 100.0),
]


def test_a_row_is_the_median_of_its_rounds_with_their_range():
    row = aggregate([r for r in ROUNDS if r["engine"] == "A"])
    assert row["speed_tokens_per_s"] == 103.0 and (row["speed_min"], row["speed_max"]) == (90.0, 115.0)
    assert row["ttft_p50_ms"] == 20.0  # the median of 10, 20, 30
    assert row["mem_mb"] == 103.0  # the peak over the rounds
    assert row["requests_ok"] == 15 and row["client_tokens"] == row["server_tokens"] == 240
    assert row["rounds"] == 3 and row["raw"] == "raw/A_u4_r1" and len(row["raw_rounds"]) == 3
    assert row["notes"] == "float32" and "round" not in row and "seq" not in row
    # A server that counts no tokens (None in one round) has no sum, not a partial one.
    assert aggregate([{**ROUNDS[0], "server_tokens": None}, ROUNDS[2]])["server_tokens"] is None
    assert list(aggregate_all(ROUNDS)) == [("A", 4), ("B", 4)]


def test_ratios_pair_the_same_round_and_say_what_they_carry():
    ratios = round_ratios(ROUNDS, "A", "B")
    assert ratios == {4: pytest.approx([1.03, 0.90, 1.15])}
    spread = Spread.of(ratios[4])
    assert (spread.median, spread.low, spread.high) == pytest.approx((1.03, 0.90, 1.15))
    # The range (0.25 wide) is wider than the distance from 1.00 (0.03).
    assert not spread.distinguishable() and spread.reading("A", "B") == "not distinguishable"
    assert spread.cell() == "1.03 (0.90–1.15)"
    assert Spread.of([0.91, 0.92, 0.93]).reading("A", "B") == "B faster"
    assert Spread.of([1.4, 1.5, 1.45]).reading("A", "B") == "A faster"
    assert Spread.of([1.4]).reading() == "one round: no spread measured"
    # A round only one side finished gives no ratio.
    assert round_ratios(ROUNDS[:-1], "A", "B") == {4: pytest.approx([1.03, 0.90])}


def test_the_second_clock_is_reported_beside_locust_and_flagged_past_5_percent():
    assert clocks_differ(Spread.of([1.0]), Spread.of([1.04])) is None
    assert clocks_differ(Spread.of([1.0]), Spread.of([0.9])) == pytest.approx(-0.1)
    rows = list(aggregate_all(ROUNDS).values())
    clock = [
        {**round_row("A", 4, n, 10 + 2 * n, a), "clock": "guidellm"} for n, a in ((1, 95.0), (2, 92.0), (3, 97.0))
    ] + [{**round_row("B", 4, n, 11 + 2 * n, 100.0), "clock": "guidellm"} for n in (1, 2, 3)]
    table = ratio_rows(rows, ROUNDS, clock, "A", "B")
    assert table[0]["ratio (median)"] == "1.03" and table[0]["ratio min–max"] == "0.90–1.15"
    assert table[0]["guidellm ratio"] == "0.95 (0.92–0.97)" and table[0]["clocks"] == "differ by -7.8%"
    cautions = ratio_cautions(table, "A", "B")
    assert any("not distinguishable" in line for line in cautions)
    assert any("guidellm's 0.95 (0.92–0.97) differ by -7.8%" in line for line in cautions)
    # Without a second clock the table has no clock columns.
    assert "guidellm ratio" not in ratio_rows(rows, ROUNDS, [], "A", "B")[0]


def test_the_report_shows_medians_ranges_and_the_second_clock(tmp_path):
    labels = [ours for ours, _, _ in VERSUS[1:2]] + [theirs for _, theirs, _ in VERSUS[1:2]]
    rename = dict(zip(("A", "B"), labels))
    rounds = [{**r, "engine": rename[r["engine"]]} for r in ROUNDS]
    clock = [{**r, "clock": "guidellm", "seq": r["seq"] + 6} for r in rounds]
    rows = list(aggregate_all(rounds).values())
    context = {
        "model": "m",
        "command": "yayi-compare ...",
        "started": "s",
        "finished": "f",
        "machine": "here",
        "repeat": 3,
        "together": "all targets up together",
        "column_notes": [],
    }
    text = markdown_report(rows, context, [], rounds, clock)
    assert "| 103.0 (90.0–115.0) |" in text  # the speed cell: median (min–max)
    assert "Each step ran 3 times" in text and "## Second clock: guidellm" in text
    assert "not distinguishable" in text and "## What the rounds do not carry" in text
    assert "What the columns hold" not in printed_summary(text)


def test_servers_compared_with_each_other_are_up_together():
    def target(label, **more):
        return SimpleNamespace(label=label, **more)

    hf_cb, matched, defaults = (
        target("hf-cb"),
        target("transformers-serve-matched"),
        target("transformers-serve-defaults"),
    )
    hf_kv, eager = target("hf-kv"), target("hf-eager")
    targets = [eager, hf_kv, hf_cb, matched, defaults]
    assert components(targets, VERSUS) == [[0], [1, 2, 3, 4]]
    sizes = {"hf-eager": 1, "hf-kv": 1, "hf-cb": 2, "transformers-serve-matched": 2, "transformers-serve-defaults": 20}

    def estimate(t):
        return sizes[t.label] * GiB

    groups, why = plan_groups(targets, VERSUS, "auto", 30 * GiB, estimate)
    assert [g.labels for g in groups] == [[t.label for t in targets]] and "all targets up together" in why
    groups, why = plan_groups(targets, VERSUS, "auto", 10 * GiB, estimate)
    assert [len(g.targets) for g in groups] == [1, 4] and "2 groups" in why
    groups, _ = plan_groups(targets, VERSUS, "all", 1 * GiB, estimate)
    assert len(groups) == 1
    # Two front ends of one server are one group whatever the memory.
    grpc = target("vllm")
    http = target("vllm-http", shares_with=grpc)
    groups, _ = plan_groups([grpc, eager, http], VERSUS, "pairs", 0, lambda t: 0)
    assert [g.labels for g in groups] == [["vllm", "vllm-http"], ["hf-eager"]]


def test_transformers_serve_left_to_its_defaults_is_capped_to_what_is_free():
    total = 24 * GiB
    assert default_cache_share(available=total * 2, total=total) is None  # it fits: its own default
    share = default_cache_share(available=19 * GiB, total=total, held=GiB)
    assert share == pytest.approx((19 - 6 - 1) / 24, abs=0.01)
    with pytest.raises(RuntimeError, match="available"):
        default_cache_share(available=6 * GiB, total=total)
    assert parse_baselines("transformers-serve") == ["transformers-serve-matched"]
    assert "transformers-serve-defaults" in BASELINES


def test_transformers_serve_defaults_command_has_no_cache_plan(tmp_path):
    target = object.__new__(TransformersServeDefaultsTarget)
    target.model_path, target.dtype, target.port = "/models/m", "float32", 8123
    target.extra_args = ["--cb-max-memory-percent", "0.02"]
    command = target.command()
    assert command[1:4] == ["serve", "/models/m", "--continuous-batching"] and "--dtype" in command
    assert not any(arg.startswith(("--cb-num-blocks", "--cb-block-size", "--cb-max-batch-tokens")) for arg in command)
    assert command[-2:] == ["--cb-max-memory-percent", "0.02"] and target.note == ""


def test_guidellm_gets_the_same_load_as_locust(tmp_path):
    load = second_clock.ClockLoad(users=4, duration_s=10, max_new_tokens=128, ignore_eos=True, prompts=("a", "b", "c"))
    rows = second_clock.data_rows(load)
    assert len(rows) == 800 and [r["prompt"] for r in rows[:4]] == ["a", "b", "c", "a"]
    assert all(r["output_tokens_count"] == 128 for r in rows)  # guidellm then sends ignore_eos
    argv = second_clock.command(
        tmp_path / "guidellm", "http://h", "m", "/tok", load, tmp_path / "d.json", tmp_path / "o"
    )
    backend = json.loads(argv[argv.index("--backend") + 1])
    assert backend["target"] == "http://h" and backend["model"] == "m" and "max_tokens" not in backend
    assert backend["extras"] == {"body": {"temperature": 0.0}}
    assert "kind=concurrent,streams=4" in argv and "kind=max_duration,seconds=10" in argv
    honour = second_clock.ClockLoad(4, 10, 128, ignore_eos=False, prompts=("a",))
    assert "output_tokens_count" not in second_clock.data_rows(honour)[0]
    argv = second_clock.command(tmp_path / "g", "http://h", "m", "/tok", honour, tmp_path / "d.json", tmp_path / "o")
    assert json.loads(argv[argv.index("--backend") + 1])["max_tokens"] == 128
    assert second_clock.pinned_spec().startswith("guidellm==0.8")


def test_guidellm_summary_is_read_from_its_json(tmp_path):
    def stats(median=0.0, mean=0.0, total=0.0, count=1):
        return {"median": median, "mean": mean, "total_sum": total, "count": count}

    metrics = {
        "request_totals": {"successful": 9, "errored": 1, "incomplete": 2, "total": 12},
        "output_tokens_per_second": {"total": stats(mean=123.4)},
        "output_token_count": {"total": stats(total=1000)},
        "time_to_first_token_ms": {"successful": stats(median=55.0)},
        "inter_token_latency_ms": {"successful": stats(median=7.0)},
    }
    path = tmp_path / "out.json"
    path.write_text(json.dumps({"benchmarks": [{"metrics": metrics, "duration": 8.1}]}))
    summary = second_clock.read_summary(path)
    assert summary["speed_tokens_per_s"] == 123.4 and summary["requests_ok"] == 9
    assert summary["requests_failed"] == 1 and summary["requests_cut"] == 2 and summary["ttft_p50_ms"] == 55.0


def test_the_plan_counts_every_round_and_clock_step():
    args = parse_args(["--users", "1,4", "--repeat", "3", "--duration", "10s"])
    targets = [SimpleNamespace(label="hf-cb"), SimpleNamespace(label="transformers-serve-matched")]
    plan = run_plan(targets, args, {"hf-cb", "transformers-serve-matched"})
    assert len(plan) == 2 * (2 + 2 * 3 + 2 * 3)  # start, idle, Locust's rounds, guidellm's rounds
    progress = Progress(plan)
    progress.done("hf-cb")
    progress.skip("transformers-serve-matched")
    assert len(progress.left) == 13
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--repeat", "0"])
    # The second clock runs where a peer is an outside server, not for hf-cb against hf-kv.
    peer = object.__new__(VLLMServerTarget)
    assert clock_pairs([SimpleNamespace(label="vllm"), peer]) == [("vllm", "vllm-openai")]
    assert clock_pairs([SimpleNamespace(label="hf-cb"), SimpleNamespace(label="hf-kv")]) == []
