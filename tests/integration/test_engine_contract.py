"""The Engine contract, in process, against every registered engine.

Each engine is started once for the module, on tiny-llama (the hf-* engines on tiny-bloom
too), and every case runs on each.  Where engines really differ, ``CAPS`` says how, and the
case checks that engine's form of the promise: llama-cpp runs GGUF weights, so its greedy
tokens are compared with llama-server's own answer rather than hf-eager's; a batching engine
decodes several streams at once; the work that stops when a consumer leaves is seen where it
runs (forward passes in process, vLLM's scheduler, llama-server's slots).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from engines import EngineConfig, SamplingParams, create_engine, engine_names
from engines.errors import EngineUnavailable, InvalidRequest, Unsupported
from engines.registry import EngineNotInstalled
from loadtest.measure.prompts import LOG_SPEED_PROMPTS as LOG_PROMPTS
from tests.helpers.engine_calls import (
    TINY_LLAMA_BAD_INPUTS,
    assert_refused,
    collect,
    generated_ids,
    llama_server_busy_slots,
    llama_server_own,
    overflow_the_queue,
    text,
    token_ids,
    wait_until,
)
from tests.helpers.marks import engine_param

QUEUE = 2  # every engine's waiting-queue bound here


@dataclass(frozen=True)
class Caps:
    """How one engine keeps the contract, where engines differ."""

    models: tuple[str, ...] = ("tiny-llama",)
    # Whose greedy tokens must equal this engine's: an engine name, or "llama-server" (its own answer).
    greedy_reference: str = "hf-eager"
    slots: int = 1  # requests decoded at once (max_concurrency); more than one is continuous batching
    # Where closing a stream is seen to stop the model: "forwards" (counted in process),
    # "vllm-scheduler" (its engine core's own count), "llama-server-slots" (its /slots report).
    work_probe: str = "forwards"
    # Forward passes a batching loop may still run after the consumer left (it cancels at its next step).
    steps_after_close: int = 0
    hf_sampler: bool = False  # seeded draws come from hf-kv's sampler code: the same tokens as hf-kv's
    scores: bool = True  # Score; else refused as unsupported
    prompt_logprobs: bool = True  # else refused by name
    score_rel: float = 1e-5  # relative agreement of a score's total log-probability with the reference's
    attention: str = ""  # what info().attention begins with
    info: dict = field(default_factory=dict)  # more of info()'s fields, as they must read
    weights_file: str = ""  # what info().model_path ends with
    options: Callable[[], object] | None = None  # the engine's Options, made when it starts
    start_timeout: float = 120


def _vllm_options():
    from engines.vllm.engine import VLLMOptions  # here: the module imports vLLM's parts only when asked

    return VLLMOptions(enforce_eager=True)  # a quicker start; test_vllm's server runs the compiled default


HF_INFO = {"dtype": "float32", "device": "cpu"}
CAPS: dict[str, Caps] = {
    # hf-eager's reference is hf-kv: the two compare with each other, both ways.
    "hf-eager": Caps(models=("tiny-llama", "tiny-bloom"), greedy_reference="hf-kv", hf_sampler=True, info=HF_INFO),
    "hf-kv": Caps(models=("tiny-llama", "tiny-bloom"), hf_sampler=True, info=HF_INFO),
    "hf-flash": Caps(models=("tiny-llama", "tiny-bloom"), hf_sampler=True, attention="sdpa-flash", info=HF_INFO),
    "hf-cb": Caps(slots=4, steps_after_close=2, hf_sampler=True, attention="paged|", info=HF_INFO),
    "vllm": Caps(
        slots=4,
        work_probe="vllm-scheduler",
        score_rel=1e-3,
        attention="vllm paged attention: ",
        info={**HF_INFO, "kv_cache_bytes": 2**30},
        options=_vllm_options,
        start_timeout=600,
    ),
    "llama-cpp": Caps(
        greedy_reference="llama-server",
        slots=4,
        work_probe="llama-server-slots",
        scores=False,
        prompt_logprobs=False,
        attention="llama.cpp",
        # tiny-llama's safetensors, converted once by llama.cpp's own converter
        info={"dtype": "bfloat16", "device": "cpu"},
        weights_file="bf16.gguf",
    ),
}
ENGINES = [engine_param(name) for name in CAPS]
ENGINE_MODELS = [engine_param(name, model, id=f"{name}-{model}") for name in CAPS for model in CAPS[name].models]


@pytest.fixture(scope="module")
def engine_for(loop):
    """``engine_for(name, model)``: the engine, started the first time it is asked for; all shut down at the end.

    One whose optional package (or llama-server build) is missing here is skipped with the
    install hint; one that fails to start fails every case that needs it, without a second try.
    """
    engines: dict[tuple[str, str], object] = {}
    failed: dict[tuple[str, str], str] = {}

    def get(name: str, model: str = "tiny-llama"):
        key = (name, model)
        if key in failed:
            pytest.fail(failed[key])
        if key not in engines:
            caps = CAPS[name]
            options = caps.options() if caps.options else None
            config = EngineConfig(model=model, max_concurrency=caps.slots, max_queue=QUEUE, options=options)
            try:
                engine = create_engine(name, config)
            except EngineNotInstalled as exc:
                pytest.skip(str(exc))
            if name == "llama-cpp":
                from engines.llama_cpp.gguf import llama_server_binary

                try:
                    llama_server_binary()
                except EngineUnavailable as exc:
                    pytest.skip(str(exc))
            try:
                loop.run(engine.start(), timeout=caps.start_timeout)
            except Exception as exc:
                failed[key] = f"{name} on {model} did not start: {type(exc).__name__}: {exc}"
                raise
            engines[key] = engine
        return engines[key]

    yield get
    for engine in engines.values():
        loop.run(engine.shutdown(), timeout=120)


def test_every_registered_engine_has_a_row():
    assert list(CAPS) == engine_names()


@pytest.mark.parametrize("name", ENGINES)
def test_info_describes_what_runs(engine_for, name):
    caps = CAPS[name]
    engine = engine_for(name)
    info = engine.info()
    assert (info.engine, info.model) == (name, "tiny-llama")
    assert info.use_cache is (name != "hf-eager")
    assert info.max_context == 1024 and info.vocab_size == len(engine.tokenizer)
    assert (info.max_concurrent_requests, info.max_queue) == (caps.slots, QUEUE)
    assert info.attention.startswith(caps.attention) and "not reported" not in info.attention, info.attention
    assert {key: getattr(info, key) for key in caps.info} == caps.info
    if caps.slots > 1:  # a shared KV cache: at least one whole context
        assert info.kv_cache_tokens >= info.max_context
    assert info.model_path.endswith(caps.weights_file), info.model_path


def test_flash_engine_reports_the_kernel_that_ran(engine_for):
    # BLOOM's ALiBi has no SDPA path in transformers: the engine must say eager, not claim flash.
    bloom = engine_for("hf-flash", "tiny-bloom").info()
    assert bloom.attention.startswith("eager"), bloom.attention


@pytest.mark.parametrize(("name", "model"), ENGINE_MODELS)
def test_stream_shape_and_usage(loop, engine_for, name, model):
    engine = engine_for(name, model)
    outputs = loop.run(collect(engine, LOG_PROMPTS[0], SamplingParams(max_new_tokens=12, ignore_eos=True)))
    assert [o.finish_reason for o in outputs[:-1]] == [None] * (len(outputs) - 1)
    assert outputs[-1].finish_reason == "length"
    assert len(token_ids(outputs)) == 12 == outputs[-1].completion_tokens
    assert [o.completion_tokens for o in outputs] == list(_running_sums(len(o.token_ids) for o in outputs)), (
        "completion_tokens counts every token so far"
    )
    assert outputs[0].started_at is not None and all(o.started_at is None for o in outputs[1:])
    assert outputs[0].started_at <= time.monotonic()
    assert all(o.prompt_tokens == len(engine.tokenizer(LOG_PROMPTS[0]).input_ids) for o in outputs)
    assert text(outputs) == engine.tokenizer.decode(token_ids(outputs), skip_special_tokens=True).rstrip("\ufffd")


def _running_sums(counts):
    total = 0
    for count in counts:
        total += count
        yield total


@pytest.fixture(scope="module")
def reference_run(loop, engine_for):
    """``reference_run(name, model, prompt, params)``: one greedy run of a reference engine, kept for the module,
    since every engine asks for it."""
    runs: dict[tuple, list] = {}

    def get(name, model, prompt, params):
        key = (name, model, prompt, params)
        if key not in runs:
            runs[key] = loop.run(collect(engine_for(name, model), prompt, params))
        return runs[key]

    return get


@pytest.mark.parametrize("penalty", [1.0, 3.0], ids=["greedy", "greedy-penalised"])
@pytest.mark.parametrize(("name", "model"), ENGINE_MODELS)
def test_greedy_equals_the_reference(loop, engine_for, reference_run, name, model, penalty):
    """Greedy is a function of the weights: the same tokens and text as the reference on the same weights.

    hf-* engines, hf-cb and vLLM run the same float32 safetensors and must equal hf-eager (or
    hf-kv, for hf-eager) token for token; llama-cpp runs a GGUF and must equal llama-server's
    own greedy answer.  A random model left alone repeats one token whatever its logits, which
    would hide a broken cache; the penalty makes every step's choice depend on the logits.
    Plain greedy is a batching loop's own argmax; with a penalty a logits processor picks.
    """
    caps = CAPS[name]
    engine = engine_for(name, model)
    params = SamplingParams(max_new_tokens=24, repetition_penalty=penalty, ignore_eos=True)
    for prompt in LOG_PROMPTS:
        ours = loop.run(collect(engine, prompt, params))
        if caps.greedy_reference == "llama-server":
            ids = engine.tokenizer(prompt).input_ids
            own = loop.run(llama_server_own(engine, ids, 24, repeat_penalty=penalty))
            assert token_ids(ours) == own["tokens"], prompt
            assert text(ours) == own["content"], prompt
            assert ours[-1].prompt_tokens == len(ids)
            reference_ids = own["tokens"]
        else:
            reference = reference_run(caps.greedy_reference, model, prompt, params)
            assert token_ids(ours) == token_ids(reference), prompt
            assert text(ours) == text(reference), prompt
            assert ours[-1].prompt_tokens == reference[-1].prompt_tokens
            reference_ids = token_ids(reference)
        if penalty != 1.0:
            assert len(set(reference_ids)) >= 12, "degenerate output cannot tell engines apart"


@pytest.mark.parametrize("name", ENGINES)
def test_seed_reproduces_alone_and_batched_and_differs(loop, engine_for, name):
    caps = CAPS[name]
    engine = engine_for(name)
    sampled = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50, ignore_eos=True)
    seeded = SamplingParams(seed=1234, **sampled)
    alone = loop.run(collect(engine, "Once upon a time", seeded))
    again = loop.run(collect(engine, "Once upon a time", seeded))
    assert token_ids(again) == token_ids(alone) and text(again) == text(alone)
    assert generated_ids(loop, engine, "Once upon a time", seed=99, **sampled) != token_ids(alone)
    if caps.slots > 1:  # decoded beside other sampled requests, the draw is still the request's own

        async def batched():
            others = [
                collect(
                    engine,
                    LOG_PROMPTS[i % 3],
                    SamplingParams(max_new_tokens=16, temperature=1.5, seed=i, ignore_eos=True),
                    f"o{i}",
                )
                for i in range(caps.slots - 1)
            ]
            results = await asyncio.gather(collect(engine, "Once upon a time", seeded, "s"), *others)
            return results[0]

        together = loop.run(batched())
        assert token_ids(together) == token_ids(alone) and text(together) == text(alone)
    if caps.hf_sampler:  # hf-kv's sampler with a generator per request: the same draw from the same logits
        assert token_ids(alone) == token_ids(loop.run(collect(engine_for("hf-kv"), "Once upon a time", seeded)))


@pytest.mark.parametrize("name", ENGINES)
def test_top_k_one_is_greedy(loop, engine_for, name):
    engine = engine_for(name)
    greedy = generated_ids(loop, engine, "Hello there", max_new_tokens=10, ignore_eos=True)
    top1 = generated_ids(
        loop, engine, "Hello there", max_new_tokens=10, temperature=2.0, top_k=1, seed=5, ignore_eos=True
    )
    assert top1 == greedy


@pytest.mark.parametrize("name", ENGINES)
def test_repetition_penalty_changes_greedy_output(loop, engine_for, name):
    engine = engine_for(name)
    plain = generated_ids(loop, engine, "a a a a", max_new_tokens=16, ignore_eos=True)
    penalised = generated_ids(loop, engine, "a a a a", max_new_tokens=16, repetition_penalty=5.0, ignore_eos=True)
    assert plain != penalised
    # A strong penalty makes a greedy random model cycle through more distinct tokens.
    assert len(set(penalised)) > len(set(plain))


@pytest.mark.parametrize("name", ENGINES)
def test_stop_string_ends_generation_and_is_not_returned(loop, engine_for, name):
    engine = engine_for(name)
    params = dict(max_new_tokens=30, repetition_penalty=3.0, ignore_eos=True)
    full = text(loop.run(collect(engine, "Hello", SamplingParams(**params))))
    stop = full[5:8]
    assert stop.strip(), f"need a visible stop string from {full!r}"
    stopped = loop.run(collect(engine, "Hello", SamplingParams(stop=(stop,), **params)))
    assert stopped[-1].finish_reason == "stop"
    assert text(stopped) == full[: full.index(stop)]
    assert stop not in text(stopped) and stopped[-1].completion_tokens < 30
    # The engine stopped too: the request is not left generating inside it.
    loop.run(wait_until(lambda: engine.load().running == 0, timeout=2, state=engine.load))


def _idle(engine) -> bool:
    """Nothing running or waiting, and no KV cache held where the engine reports one."""
    load = engine.load()
    return (load.running, load.waiting) == (0, 0) and load.kv_cache_usage in (None, 0.0)


class _WorkProbe:
    """Whether the model is still working, seen where the work runs."""

    def __init__(self, name, engine) -> None:
        self.kind, self.engine = CAPS[name].work_probe, engine
        self.calls: list[int] = []
        if self.kind == "forwards":
            # The real model's forward passes; an instance attribute, removed again in close().
            self.model = engine._runtime.model if name == "hf-cb" else engine.lm.model
            original = self.model.forward

            def counting_forward(*args, **kwargs):
                self.calls.append(1)
                return original(*args, **kwargs)

            self.model.forward = counting_forward

    async def working(self) -> bool:
        """Whether the probe sees the one request at work: so that its "idle" later can be believed."""
        if self.kind == "forwards":
            return len(self.calls) > 0
        if self.kind == "vllm-scheduler":
            return self.engine._view.latest[0] == 1
        return await llama_server_busy_slots(self.engine) == 1

    async def wait_idle(self, timeout: float) -> float:
        """Seconds until the model's work stopped (no forward pass in 0.3 s; nothing running in the
        engine core or in llama-server's slots); fails after ``timeout``."""
        start = time.monotonic()
        while True:
            if self.kind == "forwards":
                before = len(self.calls)
                await asyncio.sleep(0.3)
                idle = len(self.calls) == before
            elif self.kind == "vllm-scheduler":
                idle = self.engine._view.latest[0] == 0
            else:
                idle = await llama_server_busy_slots(self.engine) == 0
            if idle:
                return time.monotonic() - start
            assert time.monotonic() - start < timeout, f"{self.kind}: still working {timeout} s after the close"
            await asyncio.sleep(0.02)

    def close(self) -> None:
        if self.kind == "forwards":
            del self.model.forward


@pytest.mark.parametrize("how", ["aclose", "task-cancelled"])
@pytest.mark.parametrize("name", ENGINES)
def test_consumer_leaving_stops_the_work_and_frees_the_slot(loop, engine_for, name, how):
    """aclose is a client's cancel; a cancelled task is a deadline or a disconnect."""
    engine = engine_for(name)
    probe = _WorkProbe(name, engine)

    async def leave_after_three():
        stream = engine.generate("Tell me a story", SamplingParams(max_new_tokens=900, ignore_eos=True), how)
        if how == "aclose":
            taken = [await stream.__anext__() for _ in range(3)]
            busy = engine.load(), await probe.working()
            await stream.aclose()
        else:
            taken = []
            three = asyncio.Event()

            async def consume():
                async for out in stream:
                    taken.append(out)
                    if len(taken) == 3:
                        three.set()

            task = asyncio.ensure_future(consume())
            await three.wait()
            busy = engine.load(), await probe.working()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        steps_at_close = len(probe.calls)
        stopped_in = await probe.wait_idle(timeout=1.0)
        steps_when_idle = len(probe.calls)
        await wait_until(lambda: _idle(engine), timeout=1.0, state=engine.load)
        began = time.monotonic()
        following = await collect(engine, "Next", SamplingParams(max_new_tokens=2, ignore_eos=True), "next")
        return taken, busy, (steps_at_close, steps_when_idle), stopped_in, following, time.monotonic() - began

    try:
        taken, busy, steps, stopped_in, following, next_took = loop.run(leave_after_three(), timeout=30)
    finally:
        probe.close()
    load_before, seen_working = busy
    assert len(taken) >= 3 and load_before.running == 1 and seen_working, busy
    if probe.kind == "forwards":
        # At most the steps in progress when the consumer left, never the other ~897.
        steps_at_close, steps_when_idle = steps
        assert steps_when_idle <= steps_at_close + CAPS[name].steps_after_close, steps
        assert steps_when_idle < 30, steps
    assert _idle(engine), engine.load()
    assert following[-1].completion_tokens == 2 and next_took < 2, (stopped_in, next_took)


@pytest.mark.parametrize("name", ENGINES)
def test_queue_bound_refuses_at_once(loop, engine_for, name):
    engine = engine_for(name)
    refused_in = loop.run(overflow_the_queue(engine, CAPS[name].slots, QUEUE), timeout=60)
    assert refused_in < 0.5
    loop.run(wait_until(lambda: _idle(engine), timeout=2, state=engine.load))


@pytest.mark.parametrize("name", ENGINES)
def test_streams_share_the_slots(loop, engine_for, name):
    """A batching engine's streams all produce before any ends; a one-slot engine's run one after another."""
    slots = CAPS[name].slots
    engine = engine_for(name)
    streams = max(slots, 2)

    async def race():
        first: dict[int, float] = {}
        finished: dict[int, float] = {}

        async def one(i):
            async for out in engine.generate(
                LOG_PROMPTS[i % 3], SamplingParams(max_new_tokens=48, ignore_eos=True), f"s{i}"
            ):
                first.setdefault(i, time.monotonic())
                if out.finish_reason:
                    finished[i] = time.monotonic()

        await asyncio.gather(*(one(i) for i in range(streams)))
        return first, finished

    first, finished = loop.run(race())
    assert len(finished) == streams
    if slots > 1:
        assert max(first.values()) < min(finished.values())
    else:  # in whichever order the slot took them
        (a, b) = sorted(range(streams), key=first.__getitem__)
        assert first[b] > finished[a], "the second request started before the first one's slot was free"


@pytest.mark.parametrize("name", ENGINES)
def test_score(loop, engine_for, name):
    caps = CAPS[name]
    engine = engine_for(name)
    sentence = "The quick brown fox jumps over the lazy dog."
    if not caps.scores:
        with pytest.raises(Unsupported, match=f"engine {name} cannot score texts"):
            loop.run(engine.score(sentence))
        assert engine.load().running == 0
        return
    reference = loop.run(engine_for(caps.greedy_reference).score(sentence))
    result = loop.run(engine.score(sentence))
    assert result.token_count == reference.token_count == len(engine.tokenizer(sentence).input_ids) - 1
    assert result.perplexity > 1 and result.total_logprob == pytest.approx(reference.total_logprob, rel=caps.score_rel)


@pytest.mark.parametrize("name", ENGINES)
def test_prompt_logprobs_or_refused_by_name(loop, engine_for, name):
    engine = engine_for(name)
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=1)
    if not CAPS[name].prompt_logprobs:
        with pytest.raises(InvalidRequest, match="prompt's log-probabilities") as refused:
            loop.run(collect(engine, "hello world", params))
        assert refused.value.field == "prompt_logprobs"
        assert engine.load().running == 0
        return
    (output,) = loop.run(collect(engine, "hello world", params))
    ids = engine.tokenizer("hello world").input_ids
    assert output.completion_tokens == 0 and output.prompt_tokens == len(ids)
    entries = output.prompt_logprobs
    assert entries[0] is None and [e.token_id for e in entries[1:]] == ids[1:]
    assert all(math.isfinite(e.logprob) and e.logprob <= 0 and len(e.top) == 1 for e in entries[1:])


@pytest.mark.parametrize(
    ("prompt", "params", "message"), TINY_LLAMA_BAD_INPUTS, ids=["empty", "blank", "past-context", "past-max", "top-k"]
)
@pytest.mark.parametrize("name", ENGINES)
def test_bad_input_is_refused_by_name(loop, engine_for, name, prompt, params, message):
    assert_refused(loop, engine_for(name), prompt, params, message)
