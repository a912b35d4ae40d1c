"""Engines driven in process by tests: started once a module, a request's outputs and its tokens."""

from __future__ import annotations

import asyncio

import pytest

from engines import EngineConfig, SamplingParams, create_engine
from engines.errors import InvalidRequest, QueueFull

# What tiny-llama (context 1024, SmolLM2's vocabulary) must refuse, and the words that say why.
TINY_LLAMA_BAD_INPUTS = [
    ("", SamplingParams(), "prompt must not be empty"),
    ("   \n", SamplingParams(), "prompt must not be empty"),
    ("word " * 1100, SamplingParams(), "context is 1024"),
    ("hi", SamplingParams(max_new_tokens=5000), "max_new_tokens=5000"),
    ("hi", SamplingParams(top_k=60000), "top_k must be at most the vocabulary size 49152"),
]


def started_engines(loop, default_name: str | None = None):
    """A module fixture's body: ``get(name, model, **config)`` starts each engine the first time only.

    Starting a model costs seconds, so a module's tests share one engine per configuration;
    all of them are shut down when the module ends.
    """
    engines = {}

    def get(name: str | None = None, model: str = "tiny-llama", **config):
        name = name or default_name
        key = (name, model, tuple(sorted(config.items())))
        if key not in engines:
            engine = create_engine(name, EngineConfig(model=model, **config))
            loop.run(engine.start())
            engines[key] = engine
        return engines[key]

    yield get
    for engine in engines.values():
        loop.run(engine.shutdown())


async def collect(engine, prompt, params, request_id="r"):
    return [out async for out in engine.generate(prompt, params, request_id)]


def token_ids(outputs):
    return [t for out in outputs for t in out.token_ids]


def generated_ids(loop, engine, prompt, **params) -> list[int]:
    """The tokens of one request run to its end, ``params`` being its SamplingParams."""
    return token_ids(loop.run(collect(engine, prompt, SamplingParams(**params))))


async def overflow_a_queue_of_one(engine):
    """With one request running and one waiting, a third is refused at once; returns the two streams
    and the waiting one's cancelled first read, for the caller to clean up as its engine needs."""
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    streams = [engine.generate("busy", params, f"q{i}") for i in range(2)]
    await streams[0].__anext__()
    waiting = asyncio.ensure_future(streams[1].__anext__())
    await asyncio.sleep(0.2)
    assert engine.load().waiting == 1
    with pytest.raises(QueueFull, match="queue bound 1"):
        await engine.generate("one too many", params, "q3").__anext__()
    waiting.cancel()
    return streams, waiting


def assert_refused(loop, engine, prompt, params, message) -> None:
    """Refused before any work: no slot is left taken."""
    with pytest.raises(InvalidRequest, match=message):
        loop.run(collect(engine, prompt, params))
    assert engine.load().running == 0
