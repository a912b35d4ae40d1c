"""The seeded trace: arrival processes by their moments, replay across seeds and rates, workloads."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from loadtest.capacity import trace, workloads

COUNT = 4000


def moments(built: trace.Trace, rate: float) -> tuple[float, float]:
    offsets = [offset for offset, _ in built.at(rate)]
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    mean = statistics.fmean(gaps)
    return mean, statistics.pstdev(gaps) / mean


def speed(out: int = 16) -> workloads.Speed:
    return workloads.Speed(workloads.Lengths("fixed", (out,)))


@pytest.mark.parametrize(
    ("arrival", "burstiness", "cv"),
    [("poisson", 1.0, 1.0), ("constant", 1.0, 0.0), ("gamma", 0.25, 2.0), ("gamma", 4.0, 0.5)],
)
def test_arrivals_have_the_mean_and_cv_of_their_process(arrival, burstiness, cv):
    rate = 3.0
    built = trace.build(speed(), COUNT, arrival, burstiness, seed=7)
    mean, measured_cv = moments(built, rate)
    # About 4000 gaps: the sample mean and CV are within a few percent of the process's own.
    assert mean == pytest.approx(1 / rate, rel=0.08)
    assert measured_cv == pytest.approx(cv, abs=0.1 * max(cv, 0.1))


def test_gamma_with_burstiness_one_is_poisson_like():
    _, cv = moments(trace.build(speed(), COUNT, "gamma", 1.0, seed=3), 1.0)
    assert cv == pytest.approx(1.0, abs=0.1)


def test_same_seed_same_trace_other_seed_other_trace():
    work = workloads.Speed(workloads.Lengths("uniform", (8, 64)))
    first, again = trace.build(work, 50, seed=11), trace.build(work, 50, seed=11)
    assert first == again
    other = trace.build(work, 50, seed=12)
    assert [r.offset_s for r in other.requests] != [r.offset_s for r in first.requests]


def test_another_rate_replays_the_same_requests_scaled():
    built = trace.build(speed(), 40, seed=5)
    slow, fast = built.at(0.5), built.at(4.0)
    assert [r for _, r in slow] == [r for _, r in fast]
    for (t_slow, _), (t_fast, _) in zip(slow, fast, strict=True):
        assert t_slow == pytest.approx(8 * t_fast)
    assert len(built.at(2.0, count=10)) == 10


def test_bad_inputs_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="arrival"):
        trace.build(speed(), 10, "lumpy")
    with pytest.raises(ValueError, match="burstiness"):
        trace.build(speed(), 10, "gamma", 0)
    with pytest.raises(ValueError, match="rate"):
        trace.build(speed(), 10).at(0)
    with pytest.raises(ValueError, match="fixed"):
        workloads.Lengths.parse("triangle(1,2)")
    with pytest.raises(ValueError, match="LOW is above HIGH"):
        workloads.Lengths.parse("uniform(9,2)")
    with pytest.raises(ValueError, match="workload"):
        workloads.parse("nonsense", None)


def test_lengths_stay_in_their_bounds():
    rng = random.Random(0)
    normal = workloads.Lengths.parse("normal(100,50,20,150)")
    drawn = [normal.draw(rng) for _ in range(2000)]
    assert min(drawn) >= 20 and max(drawn) <= 150
    assert statistics.fmean(drawn) == pytest.approx(100 * 0.95, rel=0.1)  # clipped a little more above
    uniform = workloads.Lengths.parse("uniform(3,7)")
    assert {uniform.draw(rng) for _ in range(500)} == {3, 4, 5, 6, 7}
    assert workloads.Lengths.parse("128").draw(rng) == 128


def test_speed_workload_is_the_logs_prompts_with_exact_output():
    built = trace.build(workloads.parse("speed", None, output_tokens=32), 6)
    from loadtest.measure.prompts import LOG_SPEED_PROMPTS

    assert [r.prompt for r in built.requests[:3]] == list(LOG_SPEED_PROMPTS)
    assert {r.output_tokens for r in built.requests} == {32}


@pytest.fixture(scope="module")
def tiny_path() -> str:
    from engines.models import resolve_model

    return str(resolve_model("tiny-llama"))


def test_synthetic_prompts_have_their_token_counts(tiny_path):
    work = workloads.parse("synthetic:in=uniform(20,40),out=fixed(9)", tiny_path)
    built = trace.build(work, 12, seed=1)
    tokenizer = work.cutter.tokenizer
    for request in built.requests:
        assert 20 <= request.prompt_tokens <= 40
        assert request.output_tokens == 9
        # Decoding and encoding again may merge a token or two at the edges, never more.
        count = len(tokenizer(request.prompt, add_special_tokens=False)["input_ids"])
        assert abs(count - request.prompt_tokens) <= 2


def test_prefix_workload_shares_k_prefixes(tiny_path):
    work = workloads.parse("prefix:k=2,l=30,suffix=5,out=4", tiny_path)
    built = trace.build(work, 8, seed=2)
    prompts = [r.prompt for r in built.requests]
    assert len(set(prompts)) == 8  # every suffix unique
    heads = {p[: len(prompts[0]) // 2] for p in prompts}
    assert len(heads) == 2


def test_file_workload_reads_prompts_and_sharegpt(tmp_path, tiny_path):
    path = tmp_path / "set.jsonl"
    lines = [
        {"prompt": "Tell me a story.", "output_tokens": 12},
        {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello, how are you?"}]},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    work = workloads.parse(f"file:{path}", tiny_path)
    built = trace.build(work, 6, seed=0)
    assert {r.prompt for r in built.requests} == {"Tell me a story.", "Hi there"}
    outputs = {r.prompt: r.output_tokens for r in built.requests}
    assert outputs["Tell me a story."] == 12 and outputs["Hi there"] >= 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        workloads.parse(f"file:{bad}", tiny_path)


def test_trace_is_saved_line_by_line(tmp_path):
    built = trace.build(speed(), 5, "gamma", 2.0, seed=9)
    built.save(tmp_path / "trace.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert lines[0]["arrival"] == "gamma" and lines[0]["burstiness"] == 2.0
    assert [line["offset_s"] for line in lines[1:]] == [r.offset_s for r in built.requests]
    assert math.isclose(lines[-1]["offset_s"], built.requests[-1].offset_s)
