"""``--compile`` (engines/hf/static.py): the same greedy tokens as the uncompiled engine, a request
longer than the largest static cache served on the fallback path, cancel and deadline still
stopping the work, and bad options refused on the command line."""

from __future__ import annotations

import logging

import pytest

from engines import EngineConfig, SamplingParams, create_engine
from engines.hf.engine import HFOptions
from loadtest.launch.server_process import ServerProcess
from loadtest.measure.prompts import LOG_SPEED_PROMPTS as LOG_PROMPTS
from tests.helpers.observe import assert_deadline_stops_the_work, metric, wait_until
from tests.helpers.prepare import COMPILE_BUCKETS, SERVED_COMPILE_BUCKETS
from tests.helpers.servers import run_cli

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_new_tokens=40, ignore_eos=True)


def started(loop, name: str, model: str, **options):
    engine = create_engine(name, EngineConfig(model=model, options=HFOptions(**options)))
    loop.run(engine.start(), timeout=900)
    return engine


async def ids(engine, prompt: str, params: SamplingParams = GREEDY) -> list[int]:
    return [t async for out in engine.generate(prompt, params, "r") for t in out.token_ids]


@pytest.fixture(scope="module")
def pair(loop):
    engines = {}
    for name in ("hf-kv", "hf-flash"):
        engines[name] = (
            started(loop, name, "tiny-llama"),
            started(loop, name, "tiny-llama", compile=True, compile_buckets=COMPILE_BUCKETS),
        )
    yield engines
    for plain, compiled in engines.values():
        loop.run(plain.shutdown())
        loop.run(compiled.shutdown())


@pytest.mark.parametrize("name", ["hf-kv", "hf-flash"])
@pytest.mark.parametrize("prompt", LOG_PROMPTS)
def test_greedy_tokens_equal_without_and_with_compile(loop, pair, name, prompt):
    plain, compiled = pair[name]
    assert compiled.lm.compiled is not None and compiled.lm.compiled.buckets == (64, 256)
    assert loop.run(ids(compiled, prompt)) == loop.run(ids(plain, prompt))
    assert compiled.lm.compiled.recompiles == 0, "a request recompiled the decode step"


def test_both_buckets_and_sampling_run_compiled(loop, pair):
    plain, compiled = pair["hf-kv"]
    long_prompt = " ".join(["word"] * 80)  # past the 64 bucket: lands in the 256 one
    assert loop.run(ids(compiled, long_prompt)) == loop.run(ids(plain, long_prompt))
    sampled = SamplingParams(max_new_tokens=20, temperature=0.8, top_k=20, seed=11, repetition_penalty=1.2)
    assert loop.run(ids(compiled, "seeded", sampled)) == loop.run(ids(plain, "seeded", sampled))
    assert compiled.lm.compiled.recompiles == 0


def test_a_request_longer_than_the_largest_bucket_runs_uncompiled_and_says_so(loop, pair, caplog):
    plain, compiled = pair["hf-kv"]
    params = SamplingParams(max_new_tokens=300, ignore_eos=True)  # > 256 positions
    with caplog.at_level(logging.WARNING, logger="engines.hf.model"):
        got = loop.run(ids(compiled, "a long one", params))
    assert got == loop.run(ids(plain, "a long one", params))
    assert any("runs uncompiled" in r.getMessage() and "256" in r.getMessage() for r in caplog.records)


def test_consumer_leaving_stops_compiled_work_and_returns_the_cache(loop, pair):
    _, compiled = pair["hf-kv"]

    async def two_then_leave():
        stream = compiled.generate("leave early", SamplingParams(max_new_tokens=200, ignore_eos=True), "r")
        got = [await stream.__anext__(), await stream.__anext__()]
        await stream.aclose()
        return got

    assert len(loop.run(two_then_leave())) == 2
    assert compiled.load().running == 0
    free = compiled.lm.compiled._free
    assert len(free[256]) == 1, "the static cache was not given back to its pool"
    assert loop.run(ids(compiled, "after"))[:5], "the next request is served"


@pytest.fixture(scope="module")
def compiled_server():
    server = ServerProcess(
        "--engine", "hf-kv", "--model", "tiny-llama", "--compile", "--compile-buckets", SERVED_COMPILE_BUCKETS
    ).wait_ready(600)
    yield server
    server.stop()


def test_served_compiled_cancel_and_deadline_stop_the_work(compiled_server):
    assert any("decode compiled" in line for line in compiled_server.lines)
    stream = compiled_server.stream("cancel me", max_new_tokens=900, ignore_eos=True)
    next(stream), next(stream)
    stream.cancel()
    assert wait_until(lambda: metric(compiled_server, "yayi_requests_running") == 0)
    assert_deadline_stops_the_work(compiled_server)
    assert compiled_server.generate("next", max_new_tokens=3, timeout=10).usage.completion_tokens == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--engine", "hf-eager", "--compile"], "--compile is not an option of engine hf-eager"),
        (["--engine", "hf-kv", "--compile", "--compile-buckets", "64,x"], "comma-separated lengths"),
    ],
)
def test_bad_compile_options_exit_with_a_message(args, message):
    run = run_cli("--model", "tiny-llama", *args, timeout=60)
    assert run.returncode != 0 and message in run.stderr
    assert "Traceback" not in run.stderr
