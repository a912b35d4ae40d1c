"""Engine hf-cb (transformers' continuous batching, paged attention): what is its own, in process.  Its
servers run in tests/integration/test_engine_process.py, test_aiperf.py and test_compare_repeat.py; the
engine contract (tests/integration/test_engine_contract.py) holds it to the same
tokens, seeds, stop strings, cancel, queue bound and score as the other engines."""

from __future__ import annotations

import asyncio
import time

import pytest

from engines import EngineConfig, SamplingParams, create_engine
from engines.errors import InvalidRequest
from loadtest.measure.prompts import LOG_SPEED_PROMPTS as LOG_PROMPTS
from tests.helpers.engine_calls import collect, started_engines, wait_until


@pytest.fixture(scope="module")
def started(loop):
    yield from started_engines(loop, "hf-cb")


def test_info_names_the_paged_kernel_and_the_cache(started):
    info = started().info()
    assert info.engine == "hf-cb" and info.use_cache and info.max_context == 1024
    # The kernel observed on a request through the manager, not the one asked for.
    assert info.attention.startswith("paged|sdpa: sdpa"), info.attention
    assert "blocks x 256 tokens" in info.attention
    assert info.kv_cache_tokens >= info.max_context and info.kv_cache_bytes > 0


def test_snapshots_to_outputs_eos_length_and_backlog(started):
    """The manager's snapshots carry every token so far; a backlog of several tokens becomes one output."""
    from engines.base import EngineRequest
    from engines.hf_cb.engine import _TextStream

    runtime = started()._runtime
    eos = runtime.eos_ids[0]
    ids = runtime.tokenizer("Hello world, here I am").input_ids

    def stream(**params):
        return _TextStream(runtime, EngineRequest("t", "p", (1, 2, 3), SamplingParams(**params)))

    ended = stream(max_new_tokens=10)
    first = ended.advance(ids[:2], finished=False)
    assert first.token_ids == tuple(ids[:2]) and first.finish_reason is None and first.completion_tokens == 2
    assert ended.advance(ids[:2], finished=False) is None
    last = ended.advance(ids[:4] + [eos], finished=True)
    assert last.token_ids == (*ids[2:4], eos) and last.finish_reason == "eos" and last.completion_tokens == 5
    assert first.text + last.text == runtime.tokenizer.decode(ids[:4])
    ignored = stream(max_new_tokens=3, ignore_eos=True)
    assert ignored.advance([eos, 7, eos], finished=True).finish_reason == "length"


def test_cancelled_streams_free_their_blocks_and_the_next_request_runs_at_once(loop, started):
    engine = started()
    params = SamplingParams(max_new_tokens=900, ignore_eos=True)

    async def scenario():
        streams = [engine.generate(LOG_PROMPTS[i % 3], params, f"x{i}") for i in range(8)]
        for stream in streams[:4]:  # closed by the consumer: aclose
            await stream.__anext__()
        tasks = []
        for stream in streams[4:]:  # the consumer's task cancelled: a deadline or a disconnect
            started_event = asyncio.Event()

            async def consume(stream=stream, started_event=started_event):
                async for _ in stream:
                    started_event.set()

            tasks.append(asyncio.ensure_future(consume()))
            await started_event.wait()
        busy = engine.load()
        for stream in streams[:4]:
            await stream.aclose()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        freed_in = await wait_until(lambda: engine.load().running == 0 and engine.load().kv_cache_usage == 0, timeout=2)
        begin = time.monotonic()
        nxt = await collect(engine, "Next", SamplingParams(max_new_tokens=2, ignore_eos=True))
        return busy, freed_in, time.monotonic() - begin, nxt

    busy, freed_in, next_took, nxt = loop.run(scenario())
    assert busy.running == 8 and busy.kv_cache_usage > 0
    assert engine.load().waiting == 0
    assert nxt[-1].completion_tokens == 2 and next_took < 2, (freed_in, next_took)
    # Nothing left behind in the manager: no handler, no undelivered output.
    router = engine._runtime.manager.output_router
    assert not router.result_handlers and router.output_queue.empty()


def test_with_cuda_graphs_sampling_is_refused_by_name(started):
    """With graphs (CUDA only) there is no per-request processor; what it would drop is refused, not ignored."""
    runtime = started()._runtime
    samplers, runtime.samplers = runtime.samplers, None
    try:
        engine = started()
        engine.check_params(SamplingParams(top_k=5, seed=3))  # greedy: top_k and seed change nothing
        with pytest.raises(InvalidRequest, match="temperature"):
            engine.check_params(SamplingParams(temperature=0.7))
        with pytest.raises(InvalidRequest, match="repetition_penalty"):
            engine.check_params(SamplingParams(repetition_penalty=1.2))
    finally:
        runtime.samplers = samplers


def test_a_dead_loop_fails_its_requests_as_unavailable_and_the_engine_unhealthy(loop):
    """The manager's loop stops for every request when a step raises; the engine must say so, not hang."""
    from engines.errors import EngineUnavailable

    engine = create_engine("hf-cb", EngineConfig(model="tiny-llama"))
    loop.run(engine.start())
    try:
        model = engine._runtime.model

        def broken_forward(*args, **kwargs):
            raise RuntimeError("injected step failure")

        model.forward = broken_forward
        with pytest.raises(EngineUnavailable, match="injected step failure"):
            loop.run(collect(engine, "hello", SamplingParams(max_new_tokens=5)), timeout=10)
        assert not engine.healthy
        with pytest.raises(EngineUnavailable):
            loop.run(collect(engine, "hello again", SamplingParams(max_new_tokens=5)), timeout=10)
    finally:
        loop.run(engine.shutdown())
