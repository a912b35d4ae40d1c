"""hf-cb in a process of its own (``--engine-process``), for real.

The engine contract (tests/integration/test_engine_contract.py) holds hf-cb as it runs by
default, in the server's process.  Here the same engine in a child gives the same answers as
there (greedy and seeded tokens, log-probabilities, Score), frees a cancelled request's slot
and blocks, and lives and dies as a child should: one killed under load fails the calls in
flight and health, a server killed outright leaves no child behind, a clean stop ends the
child too, and a child that cannot start says why and is gone.
"""

from __future__ import annotations

import signal

import psutil
import pytest

from engines import EngineConfig, SamplingParams, create_engine
from engines.errors import EngineUnavailable, InvalidRequest, QueueFull
from engines.hf_cb.engine import CBOptions
from engines.process.messages import ErrorInfo
from loadtest.launch.server_process import ServerProcess
from loadtest.measure.prompts import LOG_SPEED_PROMPTS as LOG_PROMPTS
from server.grpc.wire import pb
from tests.helpers.engine_calls import collect, started_engines, text, token_ids
from tests.helpers.engine_calls import wait_until as wait_until_async
from tests.helpers.observe import dies_under_load, metric, wait_until

SERVER = ("--engine", "hf-cb", "--engine-process", "--model", "tiny-llama", "--dtype", "float32", "--http-port", "0")
# The child's death reaches the calls in flight when the socket closes: at once, bar a slow machine.
DEAD_WITHIN_S = 5


@pytest.fixture(scope="module")
def both(loop):
    """hf-cb in the test's process and in a child, the same model and slots."""
    for get in started_engines(loop, "hf-cb"):
        yield {where: get(engine_process=where == "child", max_concurrency=4) for where in ("in process", "child")}


def test_the_child_answers_as_the_engine_in_process(loop, both):
    async def answers(engine):
        greedy = await collect(engine, LOG_PROMPTS[0], SamplingParams(max_new_tokens=12, ignore_eos=True))
        seeded = await collect(engine, LOG_PROMPTS[1], SamplingParams(max_new_tokens=12, temperature=0.9, seed=7))
        scored = await collect(engine, LOG_PROMPTS[2], SamplingParams(max_new_tokens=3, logprobs=2, prompt_logprobs=1))
        return token_ids(greedy), text(greedy), token_ids(seeded), scored, await engine.score(LOG_PROMPTS[2])

    here, there = (loop.run(answers(engine), timeout=60) for engine in both.values())
    assert here[:3] == there[:3] and len(there[0]) == 12
    *_, scored_here, score_here = here
    *_, scored_there, score_there = there
    # Outputs may group tokens differently (a backlog of snapshots becomes one output), the entries may not.
    assert logprob_entries(scored_there) == logprob_entries(scored_here) and len(logprob_entries(scored_there)) == 3
    assert scored_there[0].prompt_logprobs == scored_here[0].prompt_logprobs
    assert score_there.token_count == score_here.token_count
    assert score_there.total_logprob == pytest.approx(score_here.total_logprob, rel=1e-6)
    assert both["child"].info() == both["in process"].info()


def test_a_cancelled_request_frees_its_slot_and_blocks_in_the_child(loop, both):
    engine = both["child"]

    async def scenario():
        streams = [
            engine.generate(LOG_PROMPTS[i], SamplingParams(max_new_tokens=900, ignore_eos=True), f"c{i}")
            for i in range(3)
        ]
        for stream in streams:
            await stream.__anext__()
        busy = await wait_for_load(engine, lambda load: load.running == 3)
        for stream in streams:
            await stream.aclose()
        freed = await wait_for_load(engine, lambda load: load.running == 0 and load.kv_cache_usage == 0)
        nxt = await collect(engine, "Next", SamplingParams(max_new_tokens=2, ignore_eos=True))
        return busy, freed, nxt

    busy, freed, nxt = loop.run(scenario(), timeout=30)
    assert busy.kv_cache_usage > 0 and freed.waiting == 0
    assert nxt[-1].completion_tokens == 2


def logprob_entries(outputs) -> list:
    return [entry for output in outputs for entry in output.logprobs]


async def wait_for_load(engine, condition, timeout: float = 5.0):
    """The engine's load once ``condition`` holds of it (the child tells its load every 0.1 s)."""
    await wait_until_async(lambda: condition(engine.load()), timeout=timeout, state=engine.load)
    return engine.load()


def gone_within(process: psutil.Process, timeout: float) -> bool:
    try:
        process.wait(timeout)
    except psutil.TimeoutExpired:
        return False
    return True


@pytest.mark.slow
def test_a_killed_engine_process_fails_calls_and_health():
    server = ServerProcess(*SERVER).wait_ready()
    try:
        (child,) = server.engine_processes()
        # It serves, and the model's work is the child's: it spends more CPU than the server's process.
        parent = psutil.Process(server.process.pid)
        parent_before, child_before = sum(parent.cpu_times()[:2]), sum(child.cpu_times()[:2])
        assert server.generate("count", max_new_tokens=200, ignore_eos=True).usage.completion_tokens == 200
        parent_cpu = sum(parent.cpu_times()[:2]) - parent_before
        child_cpu = sum(child.cpu_times()[:2]) - child_before
        assert child_cpu > parent_cpu, (child_cpu, parent_cpu)
        info = server.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=5)
        assert info.engine == "hf-cb" and info.attention.startswith("paged|") and info.kv_cache_tokens > 0
        # What the child says of its load reaches the metrics.
        stream = server.stream("go on", max_new_tokens=900, ignore_eos=True)
        next(stream)
        assert wait_until(lambda: metric(server, "yayi_kv_cache_usage_ratio") > 0, timeout=5)
        stream.cancel()
        assert wait_until(lambda: metric(server, "yayi_kv_cache_usage_ratio") == 0, timeout=5)
        dies_under_load(server, lambda: child.send_signal(signal.SIGKILL), DEAD_WITHIN_S)
        assert server.process.poll() is None, "the server stays up, so probes and logs can say why"
        assert any("engine process exited (exit code -9)" in line for line in server.lines)
    finally:
        server.stop()


@pytest.mark.slow
def test_a_stopped_server_stops_its_engine_process_and_a_killed_one_leaves_none():
    stopped = ServerProcess(*SERVER).wait_ready()
    (child,) = stopped.engine_processes()
    assert stopped.stop() == 0
    assert gone_within(child, 5), "the engine process outlived a clean stop"

    killed = ServerProcess(*SERVER).wait_ready()
    (child,) = killed.engine_processes()
    stream = killed.stream("go on", max_new_tokens=900, ignore_eos=True)
    next(stream)
    killed.signal(signal.SIGKILL)  # nothing of the server runs to stop it: the closed socket must
    assert gone_within(child, 10), "the engine process outlived its killed server"
    killed.stop()


def test_an_engine_that_cannot_start_says_why_and_leaves_no_process(loop):
    options = CBOptions(block_size=2)
    engine = create_engine("hf-cb", EngineConfig(model="tiny-llama", options=options, engine_process=True))
    before = set(psutil.Process().children())
    with pytest.raises(EngineUnavailable, match="--block-size must be at least 4"):
        loop.run(engine.start(), timeout=120)
    assert set(psutil.Process().children()) == before


@pytest.mark.parametrize(
    "error",
    [InvalidRequest("top_k too large", field="top_k"), QueueFull("full"), EngineUnavailable("gone"), KeyError("x")],
    ids=["invalid-with-field", "queue-full", "unavailable", "a-bug"],
)
def test_errors_cross_as_their_own_kind(error):
    rebuilt = ErrorInfo.of(error).rebuilt()
    if isinstance(error, KeyError):  # not an engine's error: a failure inside it, named
        assert type(rebuilt) is RuntimeError and str(rebuilt) == "KeyError: 'x'"
    else:
        assert type(rebuilt) is type(error) and str(rebuilt) == str(error)
        assert getattr(rebuilt, "field", None) == getattr(error, "field", None)
