"""The llama-cpp engine against llama.cpp itself: its llama-server child, on real GGUF weights."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import pytest

from engines import SamplingParams
from engines.errors import EngineUnavailable, InvalidRequest
from tests.conftest import LOG_PROMPTS
from tests.helpers.engine_calls import TINY_LLAMA_BAD_INPUTS, assert_refused, collect, started_engines, token_ids


@pytest.fixture(scope="module")
def started(loop):
    yield from started_engines(loop, "llama-cpp")


@pytest.fixture(scope="module")
def smol(started):
    return started(model="smollm2-135m", dtype="bfloat16", max_concurrency=4)


async def _llama_server_own(engine, ids, n, n_probs=0):
    """The same request straight to llama-server, on its own defaults but greedy."""
    body = {"prompt": ids, "n_predict": n, "temperature": 0, "ignore_eos": True, "return_tokens": True}
    if n_probs:
        body.update(n_probs=n_probs, post_sampling_probs=False)
    response = await engine._client.post("/completion", json=body)
    response.raise_for_status()
    return response.json()


def test_greedy_equals_llama_servers_own(loop, smol):
    ids = smol.tokenizer(LOG_PROMPTS[0]).input_ids
    outputs = loop.run(collect(smol, LOG_PROMPTS[0], SamplingParams(max_new_tokens=32, ignore_eos=True)))
    own = loop.run(_llama_server_own(smol, ids, 32))
    assert token_ids(outputs) == own["tokens"]
    assert "".join(o.text for o in outputs) == own["content"]
    assert outputs[-1].finish_reason == "length" and outputs[-1].completion_tokens == 32
    info = smol.info()
    assert info.dtype == "bfloat16" and info.model_path.endswith("bf16.gguf")


def test_logprobs_are_llama_cpps_raw_ones(loop, smol):
    ids = smol.tokenizer(LOG_PROMPTS[1]).input_ids
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=3)
    outputs = loop.run(collect(smol, LOG_PROMPTS[1], params))
    entries = [e for o in outputs for e in o.logprobs]
    own = loop.run(_llama_server_own(smol, ids, 6, n_probs=3))["completion_probabilities"]
    assert [e.token_id for e in entries] == [p["id"] for p in own]
    for entry, theirs in zip(entries, own):
        # bfloat16 matmuls over a different batch shape (a cached prompt, another slot) move the
        # last digits; a wrong convention (post-sampling, a temperature) would move them by units.
        assert entry.logprob == pytest.approx(theirs["logprob"], abs=0.05)
        assert [t.token_id for t in entry.top] == [t["id"] for t in theirs["top_logprobs"]]
        assert entry.text == smol.tokenizer.decode([entry.token_id])
        # greedy: the chosen token is the most likely one
        assert entry.top[0].token_id == entry.token_id


def test_prompt_logprobs_refused_by_name(loop, smol):
    with pytest.raises(InvalidRequest, match="prompt's log-probabilities") as refused:
        loop.run(collect(smol, "hello", SamplingParams(max_new_tokens=2, prompt_logprobs=1)))
    assert refused.value.field == "prompt_logprobs"
    assert smol.load().running == 0


def test_streams_overlap(loop, smol):
    async def one(i, seen):
        async for out in smol.generate(LOG_PROMPTS[i % 3], SamplingParams(max_new_tokens=24, ignore_eos=True), f"o{i}"):
            seen.append((i, out.finish_reason, time.monotonic()))

    async def run():
        seen = []
        await asyncio.gather(*(one(i, seen) for i in range(4)))
        return seen

    seen = loop.run(run())
    first_finish = min(t for _, finish, t in seen if finish)
    started_before = {i for i, _, t in seen if t < first_finish}
    assert started_before == {0, 1, 2, 3}, "all four streams were producing before the first one ended"


def test_cancel_frees_the_slot_within_a_second(loop, started):
    engine = started(model="tiny-llama", max_concurrency=1)

    async def run():
        stream = engine.generate("long", SamplingParams(max_new_tokens=900, ignore_eos=True), "long")
        await stream.__anext__()
        await stream.aclose()
        closed = time.monotonic()
        outputs = await collect(engine, "next", SamplingParams(max_new_tokens=1, ignore_eos=True), "next")
        return time.monotonic() - closed, outputs

    waited, outputs = loop.run(run())
    assert outputs[-1].completion_tokens == 1
    assert waited < 1.0, f"the next request waited {waited:.2f} s for the cancelled one's slot"
    assert engine.load().running == 0 and engine.load().kv_cache_usage == 0


@pytest.mark.parametrize(("prompt", "params", "message"), TINY_LLAMA_BAD_INPUTS)
def test_bad_input(loop, started, prompt, params, message):
    assert_refused(loop, started(model="tiny-llama", max_concurrency=1), prompt, params, message)


def test_a_dead_llama_server_fails_requests_and_health(loop, started):
    engine = started(model="tiny-llama", max_concurrency=2, max_queue=4)

    async def run():
        stream = engine.generate("x", SamplingParams(max_new_tokens=900, ignore_eos=True), "doomed")
        await stream.__anext__()
        engine._process.send_signal(signal.SIGKILL)
        began = time.monotonic()
        with pytest.raises(EngineUnavailable):
            async for _ in stream:
                pass
        took = time.monotonic() - began
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(engine._process.wait(), 5)
        await asyncio.sleep(0.1)
        return took

    took = loop.run(run())
    assert took < 5
    assert not engine.healthy
    with pytest.raises(EngineUnavailable, match="restart"):
        loop.run(collect(engine, "after", SamplingParams(max_new_tokens=2)))


def test_a_request_after_llama_servers_keep_alive_ran_out(loop, smol):
    """llama-server closes idle connections after 5 s; the next request must not land on a closed one."""
    first = loop.run(collect(smol, "one", SamplingParams(max_new_tokens=2, ignore_eos=True)))
    time.sleep(6)
    second = loop.run(collect(smol, "two", SamplingParams(max_new_tokens=2, ignore_eos=True)))
    assert first[-1].completion_tokens == second[-1].completion_tokens == 2
