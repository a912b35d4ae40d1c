"""Engines driven in process by tests: started once a module, a request's outputs and its tokens."""

from __future__ import annotations

import asyncio
import time

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


def text(outputs) -> str:
    return "".join(out.text for out in outputs)


def generated_ids(loop, engine, prompt, **params) -> list[int]:
    """The tokens of one request run to its end, ``params`` being its SamplingParams."""
    return token_ids(loop.run(collect(engine, prompt, SamplingParams(**params))))


async def wait_until(condition, timeout: float, state=None) -> float:
    """Seconds until ``condition()`` held; fails after ``timeout``, showing ``state()`` when given."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"condition not met in {timeout:g} s" + (
            f": {state()}" if state else ""
        )
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def overflow_the_queue(engine, running: int, queue: int) -> float:
    """With ``running`` requests decoding and ``queue`` waiting, one more is refused; returns how long the
    refusal took.  Every stream is closed again before returning, and the engine left idle."""
    params = SamplingParams(max_new_tokens=900, ignore_eos=True)
    streams = [engine.generate("busy", params, f"q{i}") for i in range(running + queue)]
    for stream in streams[:running]:
        await stream.__anext__()
    waiting = [asyncio.ensure_future(stream.__anext__()) for stream in streams[running:]]
    try:
        await wait_until(lambda: engine.load().waiting == queue, timeout=2, state=engine.load)
        load = engine.load()
        assert (load.running, load.waiting) == (running, queue)
        began = time.monotonic()
        with pytest.raises(QueueFull, match=f"queue bound {queue}"):
            await engine.generate("one too many", params, "extra").__anext__()
        return time.monotonic() - began
    finally:
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


def assert_refused(loop, engine, prompt, params, message) -> None:
    """Refused before any work: no slot is left taken."""
    with pytest.raises(InvalidRequest, match=message):
        loop.run(collect(engine, prompt, params))
    assert engine.load().running == 0


async def llama_server_own(engine, ids, n, n_probs=0, **sampling):
    """The same request straight to a llama-cpp engine's llama-server, on its own defaults but greedy.

    ``sampling``: more of llama-server's own /completion fields (``repeat_penalty``, ...)."""
    body = {"prompt": list(ids), "n_predict": n, "temperature": 0, "ignore_eos": True, "return_tokens": True}
    body.update(sampling)
    if n_probs:
        body.update(n_probs=n_probs, post_sampling_probs=False)
    async with engine._client.post("/completion", json=body, raise_for_status=True) as response:
        return await response.json()


async def llama_server_busy_slots(engine) -> int:
    """How many of llama-server's slots are processing a request, by its own /slots report."""
    async with engine._client.get("/slots", raise_for_status=True) as response:
        return sum(1 for slot in await response.json() if slot.get("is_processing"))
