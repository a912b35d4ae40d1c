"""The llama-cpp engine against llama.cpp itself: its llama-server child, on real GGUF weights.

What is its own: llama.cpp's raw log-probabilities, a killed llama-server, llama-server's
keep-alive.  The engine contract (tests/integration/test_engine_contract.py) runs it beside the
other engines: greedy tokens equal to llama-server's own, streams batched, a cancelled stream's
slot freed, the queue bound, bad input and prompt log-probabilities refused by name."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import pytest

from engines import SamplingParams
from engines.errors import EngineUnavailable
from loadtest.measure.prompts import LOG_SPEED_PROMPTS as LOG_PROMPTS
from tests.helpers.engine_calls import collect, llama_server_own, started_engines

pytestmark = pytest.mark.llama_cpp


@pytest.fixture(scope="module")
def started(loop):
    yield from started_engines(loop, "llama-cpp")


@pytest.fixture(scope="module")
def smol(started):
    return started(model="smollm2-135m", dtype="bfloat16", max_concurrency=4)


def test_logprobs_are_llama_cpps_raw_ones(loop, smol):
    ids = smol.tokenizer(LOG_PROMPTS[1]).input_ids
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=3)
    outputs = loop.run(collect(smol, LOG_PROMPTS[1], params))
    entries = [e for o in outputs for e in o.logprobs]
    own = loop.run(llama_server_own(smol, ids, 6, n_probs=3))["completion_probabilities"]
    assert [e.token_id for e in entries] == [p["id"] for p in own]
    for entry, theirs in zip(entries, own):
        # bfloat16 matmuls over a different batch shape (a cached prompt, another slot) move the
        # last digits; a wrong convention (post-sampling, a temperature) would move them by units.
        assert entry.logprob == pytest.approx(theirs["logprob"], abs=0.05)
        assert [t.token_id for t in entry.top] == [t["id"] for t in theirs["top_logprobs"]]
        assert entry.text == smol.tokenizer.decode([entry.token_id])
        # greedy: the chosen token is the most likely one
        assert entry.top[0].token_id == entry.token_id


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
