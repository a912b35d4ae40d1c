"""Engine hf-cb (transformers' continuous batching, paged attention): the engine contract, in process,
plus one real server.  tiny-llama, float32: the same function as hf-kv, so the same tokens."""

from __future__ import annotations

import asyncio
import time

import pytest

from engines import EngineConfig, SamplingParams, create_engine
from engines.errors import InvalidRequest
from loadtest import scrape
from loadtest.server_process import ServerProcess
from server.wire import pb
from tests.conftest import LOG_PROMPTS
from tests.helpers.engine_calls import (
    TINY_LLAMA_BAD_INPUTS,
    assert_refused,
    collect,
    generated_ids,
    overflow_a_queue_of_one,
    started_engines,
    token_ids,
)


@pytest.fixture(scope="module")
def started(loop):
    yield from started_engines(loop, "hf-cb")


def text(outputs):
    return "".join(out.text for out in outputs)


async def wait_until(condition, timeout: float) -> float:
    """Seconds until ``condition()`` held; fails after ``timeout``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def test_info_names_the_paged_kernel_and_the_cache(started):
    info = started().info()
    assert info.engine == "hf-cb" and info.use_cache and info.max_context == 1024
    # The kernel observed on a request through the manager, not the one asked for.
    assert info.attention.startswith("paged|sdpa: sdpa"), info.attention
    assert "blocks x 256 tokens" in info.attention
    assert info.kv_cache_tokens >= info.max_context and info.kv_cache_bytes > 0


@pytest.mark.parametrize("penalty", [1.0, 3.0], ids=["greedy", "greedy-penalised"])
def test_greedy_equals_hf_kv_token_for_token(loop, started, penalty):
    """Plain greedy is the manager's own argmax; with a penalty our processor picks the token."""
    params = SamplingParams(max_new_tokens=24, repetition_penalty=penalty, ignore_eos=True)
    for prompt in LOG_PROMPTS:
        ours = token_ids(loop.run(collect(started(), prompt, params)))
        reference = token_ids(loop.run(collect(started("hf-kv"), prompt, params)))
        assert ours == reference, prompt
        if penalty != 1.0:
            assert len(set(ours)) >= 12, "degenerate output cannot tell engines apart"


def test_stream_shape_and_usage(loop, started):
    engine = started()
    outputs = loop.run(collect(engine, LOG_PROMPTS[0], SamplingParams(max_new_tokens=12, ignore_eos=True)))
    assert [o.finish_reason for o in outputs[:-1]] == [None] * (len(outputs) - 1)
    assert outputs[-1].finish_reason == "length" and outputs[-1].completion_tokens == 12 == len(token_ids(outputs))
    assert outputs[0].started_at is not None and all(o.started_at is None for o in outputs[1:])
    assert outputs[0].started_at <= time.monotonic()
    assert outputs[-1].prompt_tokens == len(engine.tokenizer(LOG_PROMPTS[0]).input_ids)
    assert text(outputs) == engine.tokenizer.decode(token_ids(outputs), skip_special_tokens=True).rstrip("\ufffd")


def test_eight_streams_all_start_before_any_ends(loop, started):
    engine = started()

    async def one(i):
        first = None
        async for out in engine.generate(
            LOG_PROMPTS[i % 3], SamplingParams(max_new_tokens=200, ignore_eos=True), f"c{i}"
        ):
            first = first or time.monotonic()
            last = out
        return first, time.monotonic(), last

    async def eight():
        return await asyncio.gather(*(one(i) for i in range(8)))

    results = loop.run(eight())
    assert max(first for first, _, _ in results) < min(end for _, end, _ in results)
    assert all(last.finish_reason == "length" and last.completion_tokens == 200 for _, _, last in results)


def test_seed_reproduces_alone_and_batched(loop, started):
    engine = started()
    sampled = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50, ignore_eos=True)
    seeded = SamplingParams(seed=1234, **sampled)
    alone = loop.run(collect(engine, "Once upon a time", seeded))

    async def batched():
        others = [
            collect(
                engine,
                LOG_PROMPTS[i % 3],
                SamplingParams(max_new_tokens=16, temperature=1.5, seed=i, ignore_eos=True),
                f"o{i}",
            )
            for i in range(7)
        ]
        results = await asyncio.gather(collect(engine, "Once upon a time", seeded, "s"), *others)
        return results[0]

    together = loop.run(batched())
    assert token_ids(together) == token_ids(alone) and text(together) == text(alone)
    # Our sampler is hf-kv's code with a generator per request: the same draw from the same logits.
    assert token_ids(alone) == token_ids(loop.run(collect(started("hf-kv"), "Once upon a time", seeded)))
    other_seed = generated_ids(loop, engine, "Once upon a time", seed=99, **sampled)
    assert other_seed != token_ids(alone)


def test_top_k_one_is_greedy(loop, started):
    engine = started()
    greedy = generated_ids(loop, engine, "Hello there", max_new_tokens=10, ignore_eos=True)
    top1 = generated_ids(
        loop, engine, "Hello there", max_new_tokens=10, temperature=2.0, top_k=1, seed=5, ignore_eos=True
    )
    assert top1 == greedy


def test_stop_string_ends_generation_and_is_not_returned(loop, started):
    engine = started()
    params = dict(max_new_tokens=30, repetition_penalty=3.0, ignore_eos=True)
    free = loop.run(collect(engine, "Hello", SamplingParams(**params)))
    full = text(free)
    stop = full[5:8]
    assert stop.strip(), f"need a visible stop string from {full!r}"
    stopped = loop.run(collect(engine, "Hello", SamplingParams(stop=(stop,), **params)))
    assert stopped[-1].finish_reason == "stop"
    assert text(stopped) == full[: full.index(stop)]
    assert stopped[-1].completion_tokens < 30
    # The manager stopped too: its request was cancelled, not left generating.
    loop.run(wait_until(lambda: engine.load().running == 0, timeout=2))


def test_snapshots_to_outputs_eos_length_and_backlog(started):
    """The manager's snapshots carry every token so far; a backlog of several tokens becomes one output."""
    from engines.base import EngineRequest
    from engines.hf_cb import _TextStream

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


def test_queue_bound_refuses_at_once(loop, started):
    engine = started(max_concurrency=1, max_queue=1)

    async def overload():
        streams, waiting = await overflow_a_queue_of_one(engine)
        await asyncio.gather(waiting, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
        await wait_until(lambda: engine.load().running == 0, timeout=2)
        return engine.load()

    load = loop.run(overload())
    assert (load.running, load.waiting) == (0, 0)


@pytest.mark.parametrize("prompt, params, message", TINY_LLAMA_BAD_INPUTS)
def test_bad_input_is_refused(loop, started, prompt, params, message):
    assert_refused(loop, started(), prompt, params, message)


def test_with_cuda_graphs_sampling_is_refused_by_name(started):
    """With graphs (CUDA only) there is no per-request processor; what it would drop is refused, not ignored."""
    runtime = started()._runtime
    samplers, runtime.samplers = runtime.samplers, None
    try:
        engine = started()
        engine._check_params(SamplingParams(top_k=5, seed=3))  # greedy: top_k and seed change nothing
        with pytest.raises(InvalidRequest, match="temperature"):
            engine._check_params(SamplingParams(temperature=0.7))
        with pytest.raises(InvalidRequest, match="repetition_penalty"):
            engine._check_params(SamplingParams(repetition_penalty=1.2))
    finally:
        runtime.samplers = samplers


def test_score_equals_hf_kv(loop, started):
    text_ = "The quick brown fox jumps over the lazy dog."
    ours = loop.run(started().score(text_))
    reference = loop.run(started("hf-kv").score(text_))
    assert ours.token_count == reference.token_count == len(started().tokenizer(text_).input_ids) - 1
    assert ours.perplexity > 1 and ours.total_logprob == pytest.approx(reference.total_logprob, rel=1e-5)


def test_real_server_streams_and_exports_kv_cache_usage():
    server = ServerProcess("--engine", "hf-cb", "--model", "tiny-llama").wait_ready()
    try:
        chunks = list(server.stream(LOG_PROMPTS[2], max_new_tokens=20, ignore_eos=True))
        assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 20
        assert sum(len(c.token_ids) for c in chunks) == 20
        info = server.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=5)
        assert info.engine == "hf-cb" and info.attention.startswith("paged|") and info.kv_cache_tokens > 0
        samples = scrape.parse(scrape.fetch(f"http://127.0.0.1:{server.metrics_port}/metrics"))
        assert scrape.total(samples, "yayi_kv_cache_usage_ratio") == 0.0
    finally:
        server.stop()


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
