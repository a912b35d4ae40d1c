"""The target's terms, a step's figures and the rate search, down to finding a known capacity."""

from __future__ import annotations

import asyncio
import math

import pytest

from loadtest.capacity import client, sweep
from tests.unit.test_capacity_client import SlotServer, fixed_trace


def test_slo_terms_parse_and_bad_ones_are_refused():
    terms = sweep.parse_slo("ttft_p99=2s,tpot_p90=200ms,e2e_p50=10")
    assert [(t.metric, t.percentile, t.bound_s) for t in terms] == [("ttft", 99, 2), ("tpot", 90, 0.2), ("e2e", 50, 10)]
    for bad in ("", "ttft=2s", "latency_p99=1s", "ttft_p99=fast", "ttft_p0=1s"):
        with pytest.raises(ValueError):
            sweep.parse_slo(bad)


def sample(index, ttft, e2e, tokens=5, status=client.OK, sent=None, queue=0):
    made = client.Sample(index, scheduled_s=index * 0.1, sent_s=index * 0.1 if sent is None else sent)
    made.ttft_s, made.e2e_s, made.tokens, made.status = ttft, e2e, tokens, status
    made.itls_s = [(e2e - ttft) / (tokens - 1)] * (tokens - 1) if status == client.OK else []
    made.in_flight_at_send = queue
    return made


def test_goodput_counts_requests_meeting_every_term_and_failures_count_as_late():
    terms = sweep.parse_slo("ttft_p99=1s,tpot_p99=100ms")
    samples = [sample(i, 0.2, 0.6) for i in range(8)]  # TPOT 0.1 s: just good
    samples.append(sample(8, 1.5, 1.9))  # TTFT too late
    samples.append(sample(9, 0, 0, status=client.REFUSED))
    row = sweep.summarize(client.Step(10.0, samples, 0.0, 0.1, 2.0), terms)
    assert row["good_pct"] == pytest.approx(80.0)
    assert row["refused"] == 1 and row["ok"] == 9
    assert 0 < row["goodput_rps"] <= row["achieved_rps"]
    assert row["meets"] is False and "ttft_p99" in row["why"]
    assert row["ttft_p50_s"] == pytest.approx(0.2)


def test_a_growing_wait_for_the_first_token_is_saturation_and_a_burst_in_flight_is_not():
    rising = [sample(i, 0.1 + 0.05 * i, 0.5 + 0.05 * i) for i in range(40)]
    steady = [sample(i, 0.1, 0.5) for i in range(40)]
    assert sweep.queue_grew(rising) and not sweep.queue_grew(steady)
    # More in flight with the same wait: a burst of arrivals or a batch that fills (Little's law), not a queue.
    burst = [sample(i, 0.1, 0.5, queue=i) for i in range(40)]
    assert not sweep.queue_grew(burst)


def test_answers_that_fall_behind_the_sends_are_saturation_and_a_spread_of_latencies_is_not():
    # 40 sent over 3.9 s, each answered 1 s later: all within the shifted span.
    keeping_up = [sample(i, 0.1, 1.0) for i in range(40)]
    assert not sweep.falls_behind(keeping_up)
    # The same sends with latencies from 0.5 to 2 s (a batch that fills): still every answer keeps pace.
    spread = [sample(i, 0.1, 0.5 + 1.5 * (i % 7) / 6) for i in range(40)]
    assert not sweep.falls_behind(spread)
    # Served one at a time, 0.2 s each, at 10/s sent: answers come at 5/s.
    behind = [sample(i, 0.1 + 0.1 * i, 0.2 * (i + 1) - 0.1 * i) for i in range(40)]
    assert sweep.falls_behind(behind)
    assert not sweep.falls_behind(behind[:10])  # too few answers to tell


def test_the_search_doubles_then_bisects_to_the_tolerance():
    search = sweep.Search(start=1.0, factor=2.0, maximum=100, tolerance=0.1)
    true_capacity = 11.0
    rates = []
    while (rate := search.next_rate()) is not None:
        rates.append(rate)
        search.record(rate, rate <= true_capacity)
    assert rates[:5] == [1, 2, 4, 8, 16]
    assert search.capacity <= true_capacity < search.failed
    assert search.failed / search.capacity <= 1.1


def test_the_search_goes_down_when_the_start_fails_and_stops_at_the_maximum():
    search = sweep.Search(start=4.0, tolerance=0.1)
    while (rate := search.next_rate()) is not None:
        search.record(rate, rate <= 1.3)
    assert search.capacity == pytest.approx(1.3, rel=0.1) or search.capacity <= 1.3
    assert search.capacity is not None and search.capacity >= 1.3 / 1.1
    capped = sweep.Search(start=1.0, maximum=4.0)
    while (rate := capped.next_rate()) is not None:
        capped.record(rate, True)
    assert capped.capacity == 4.0 and capped.failed is None
    with pytest.raises(ValueError):
        sweep.Search(start=0)


def test_the_search_finds_a_servers_known_capacity_within_ten_percent():
    """8 slots, 0.2 s per request: 40 requests/s.  Constant arrivals: below capacity nobody waits, above it
    the queue grows; the target is a TTFT that a request waiting its turn misses."""
    slots, service = 8, 0.2
    capacity = slots / service
    terms = sweep.parse_slo(f"ttft_p99={service / 2}s")
    search = sweep.Search(start=capacity / 2, factor=2.0, maximum=capacity * 4, tolerance=0.05)
    built = fixed_trace(48, tokens=4)

    async def measure(rate: float) -> dict:
        async with SlotServer(slots, service) as url:
            step = await client.run_step(client.HttpWire(url, "m"), built.at(rate), rate, max_lag_s=0.05, timeout_s=30)
        return sweep.summarize(step, terms)

    rows = []
    while (rate := search.next_rate()) is not None:
        row = asyncio.run(measure(rate))
        rows.append(row)
        assert row["valid"], f"the client fell behind at {rate:.1f}/s (lag p99 {row['lag_p99_s']:.3f} s)"
        search.record(rate, row["meets"])
    assert search.capacity == pytest.approx(capacity, rel=0.1)
    for row in rows:
        assert row["goodput_rps"] <= row["achieved_rps"] + 1e-9
        assert row["achieved_rps"] <= row["sent_rps"] * 1.15
        if row["offered_rps"] > capacity * 1.2:
            assert row["saturated"] and not math.isclose(row["achieved_rps"], row["sent_rps"], rel_tol=0.1)


def test_the_steps_left_shrink_to_none():
    search = sweep.Search(start=1.0, factor=2.0, maximum=16, tolerance=0.1)
    counts = []
    while (rate := search.next_rate()) is not None:
        counts.append(search.steps_left())
        search.record(rate, rate <= 5)
    assert counts[0] >= 5 and search.steps_left() == 0
    assert all(count >= 1 for count in counts)


def test_the_ramp_up_of_an_open_loop_is_not_a_growing_queue():
    """Requests of 9 s arriving every 0.5 s for 8 s: nothing was sent past the ramp-up (one median E2E after
    the first send), so no verdict of growth, whatever the waits."""
    ramp = [sample(i, 0.1 + 0.1 * i, 9.0, sent=i * 0.5, queue=i) for i in range(16)]
    assert not sweep.queue_grew(ramp)
    # Past the ramp-up (answers in 1 s), the same climb of the first token's wait is growth.
    assert sweep.queue_grew([sample(i, 0.1 + 0.1 * i, 1.0 + 0.1 * i, sent=i * 0.5) for i in range(16)])
