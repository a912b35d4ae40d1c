"""The Engine contract, run against every engine that can run here, in process."""

from __future__ import annotations

import asyncio

import pytest

from engines import SamplingParams
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

ENGINES = ["hf-eager", "hf-kv", "hf-flash"]
MODELS = ["tiny-llama", "tiny-bloom"]


@pytest.fixture(scope="module")
def started(loop):
    yield from started_engines(loop)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", ENGINES)
def test_stream_shape_and_usage(loop, started, name, model):
    engine = started(name, model)
    outputs = loop.run(collect(engine, LOG_PROMPTS[0], SamplingParams(max_new_tokens=12, ignore_eos=True)))
    assert [o.finish_reason for o in outputs[:-1]] == [None] * (len(outputs) - 1)
    assert outputs[-1].finish_reason == "length"
    assert len(token_ids(outputs)) == 12 == outputs[-1].completion_tokens
    assert outputs[0].started_at is not None and all(o.started_at is None for o in outputs[1:])
    assert outputs[-1].prompt_tokens == len(engine.tokenizer(LOG_PROMPTS[0]).input_ids)
    joined = "".join(o.text for o in outputs)
    assert joined == engine.tokenizer.decode(token_ids(outputs), skip_special_tokens=True).rstrip("\ufffd")


@pytest.mark.parametrize("model", MODELS)
def test_greedy_identical_across_engines(loop, started, model):
    """The cache and the flash kernel compute the same function: same greedy tokens, float32.

    A random model left alone repeats one token whatever its logits, which would hide a
    broken cache; the repetition penalty makes every step's choice depend on the logits.
    """
    params = SamplingParams(max_new_tokens=24, repetition_penalty=3.0, ignore_eos=True)
    for prompt in LOG_PROMPTS:
        by_engine = {name: token_ids(loop.run(collect(started(name, model), prompt, params))) for name in ENGINES}
        assert len(set(by_engine["hf-eager"])) >= 12, "degenerate output cannot tell engines apart"
        assert by_engine["hf-kv"] == by_engine["hf-eager"], prompt
        assert by_engine["hf-flash"] == by_engine["hf-eager"], prompt


def test_flash_engine_reports_the_kernel_that_ran(started):
    llama = started("hf-flash", "tiny-llama").info()
    assert llama.attention.startswith("sdpa-flash"), llama.attention
    # BLOOM's ALiBi has no SDPA path in transformers: the engine must say eager, not claim flash.
    bloom = started("hf-flash", "tiny-bloom").info()
    assert bloom.attention.startswith("eager"), bloom.attention
    assert started("hf-eager").info().use_cache is False
    assert started("hf-kv").info().use_cache is True


@pytest.mark.parametrize("name", ENGINES)
def test_seed_reproduces_and_differs(loop, started, name):
    engine = started(name)
    params = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, ignore_eos=True)
    first = generated_ids(loop, engine, "Once upon a time", seed=1234, **params)
    again = generated_ids(loop, engine, "Once upon a time", seed=1234, **params)
    other = generated_ids(loop, engine, "Once upon a time", seed=99, **params)
    assert first == again
    assert first != other


def test_top_k_one_is_greedy(loop, started):
    engine = started("hf-kv")
    greedy = generated_ids(loop, engine, "Hello there", max_new_tokens=10, ignore_eos=True)
    top1 = generated_ids(
        loop, engine, "Hello there", max_new_tokens=10, temperature=2.0, top_k=1, seed=5, ignore_eos=True
    )
    assert top1 == greedy


def test_repetition_penalty_changes_greedy_output(loop, started):
    engine = started("hf-kv")
    plain = generated_ids(loop, engine, "a a a a", max_new_tokens=16, ignore_eos=True)
    penalised = generated_ids(loop, engine, "a a a a", max_new_tokens=16, repetition_penalty=5.0, ignore_eos=True)
    assert plain != penalised
    # A strong penalty makes a greedy random model cycle through more distinct tokens.
    assert len(set(penalised)) > len(set(plain))


def test_stop_string_ends_generation_and_is_not_returned(loop, started):
    engine = started("hf-kv")
    free = loop.run(collect(engine, "Hello", SamplingParams(max_new_tokens=30, ignore_eos=True)))
    text = "".join(o.text for o in free)
    stop = text[5:8]
    assert stop.strip(), f"need a visible stop string from {text!r}"
    stopped = loop.run(collect(engine, "Hello", SamplingParams(max_new_tokens=30, stop=(stop,), ignore_eos=True)))
    stopped_text = "".join(o.text for o in stopped)
    assert stopped[-1].finish_reason == "stop"
    assert stopped_text == text[: text.index(stop)]
    assert stop not in stopped_text


@pytest.fixture
def forward_calls(started):
    """Counts the real model's forward passes of an engine, to see when work really stops."""
    patched = []

    def attach(engine):
        calls = []
        original = engine.lm.model.forward

        def counting_forward(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        engine.lm.model.forward = counting_forward
        patched.append(engine)
        return calls

    yield attach
    for engine in patched:
        del engine.lm.model.forward


@pytest.mark.parametrize("name", ENGINES)
def test_consumer_leaving_stops_the_work(loop, started, forward_calls, name):
    engine = started(name)
    calls = forward_calls(engine)

    async def take_three_then_leave():
        stream = engine.generate("Tell me a story", SamplingParams(max_new_tokens=500, ignore_eos=True), "leave")
        taken = [await stream.__anext__() for _ in range(3)]
        await stream.aclose()
        calls_at_close = len(calls)
        await asyncio.sleep(0.3)
        return taken, calls_at_close, engine.load()

    taken, calls_at_close, load_after = loop.run(take_three_then_leave())
    assert len(taken) == 3
    # At most the step in progress when the consumer left, never the other 497.
    assert calls_at_close <= 5 and len(calls) == calls_at_close
    assert load_after.running == 0 and load_after.waiting == 0
    outputs = loop.run(collect(engine, "Next", SamplingParams(max_new_tokens=2, ignore_eos=True)), timeout=10)
    assert outputs[-1].completion_tokens == 2


def test_cancelled_task_releases_slot(loop, started):
    engine = started("hf-kv")

    async def cancel_mid_stream():
        first_token = asyncio.Event()

        async def consume():
            async for _ in engine.generate("x", SamplingParams(max_new_tokens=900, ignore_eos=True), "c"):
                first_token.set()

        task = asyncio.ensure_future(consume())
        await first_token.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return engine.load()

    load = loop.run(cancel_mid_stream())
    assert (load.running, load.waiting) == (0, 0)


def test_queue_bound_refuses_at_once(loop, started):
    engine = started("hf-kv", max_queue=1)

    async def overload():
        streams, _ = await overflow_a_queue_of_one(engine)
        for stream in streams:
            await stream.aclose()
        return engine.load()

    load = loop.run(overload())
    assert (load.running, load.waiting) == (0, 0)


@pytest.mark.parametrize("name", ENGINES)
def test_score_equal_across_engines_and_finite(loop, started, name):
    text = "The quick brown fox jumps over the lazy dog."
    reference = loop.run(started("hf-eager").score(text))
    result = loop.run(started(name).score(text))
    assert result.token_count == len(started(name).tokenizer(text).input_ids) - 1
    assert result.perplexity > 1 and result.perplexity == pytest.approx(reference.perplexity, rel=1e-4)


@pytest.mark.parametrize("prompt, params, message", TINY_LLAMA_BAD_INPUTS)
def test_model_dependent_checks(loop, started, prompt, params, message):
    assert_refused(loop, started("hf-kv"), prompt, params, message)
