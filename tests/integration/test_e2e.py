"""A real yayi-serve process on a real port, called by a real gRPC client."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loadtest.launch.server_process import ROOT, ServerProcess, request
from loadtest.measure.prompts import LOG_SPEED_PROMPTS as LOG_PROMPTS
from server.grpc.wire import SERVICE_NAME, pb
from tests.helpers.observe import assert_deadline_stops_the_work, metric, raw_stream, wait_until
from tests.helpers.servers import run_cli


def test_unary_generate(tiny_server):
    response = tiny_server.generate(LOG_PROMPTS[0], max_new_tokens=16, ignore_eos=True)
    assert response.finish_reason == "length"
    assert len(response.token_ids) == response.usage.completion_tokens == 16
    assert response.usage.prompt_tokens > 0
    assert response.request_id, "the server makes a request_id when none is given"
    assert 0 < response.ttft_ms <= response.e2e_ms
    echoed = tiny_server.generate("hi", request_id="my-id-1", max_new_tokens=2)
    assert echoed.request_id == "my-id-1"


def test_stream_chunks_arrive_while_generating_and_match_unary(tiny_server):
    params = dict(max_new_tokens=400, ignore_eos=True)
    stream = tiny_server.stream(LOG_PROMPTS[1], **params)
    first = next(stream)
    running_during = metric(tiny_server, "yayi_requests_running")
    chunks = [first, *stream]
    assert running_during == 1, "the first chunk must arrive while the model is still generating"
    assert all(c.finish_reason == "" for c in chunks[:-1]) and chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 400
    assert sum(len(c.token_ids) for c in chunks) == 400
    unary = tiny_server.generate(LOG_PROMPTS[1], **params)
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)


def test_health_reflection_and_model_info(tiny_server):
    assert tiny_server.health_status() == health_pb2.HealthCheckResponse.SERVING
    assert tiny_server.health_status(SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(tiny_server.channel)
    answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    services = {s.name for s in answer.list_services_response.service}
    assert {"yayi.serving.v1.Inference", "grpc.health.v1.Health"} <= services
    info = tiny_server.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=5)
    assert (info.engine, info.model, info.device, info.dtype) == ("hf-kv", "tiny-llama", "cpu", "float32")
    assert info.use_cache and info.max_context == 1024 and info.vocab_size == 49152
    assert info.attention.startswith("eager") and info.max_queue == 2


@pytest.fixture(scope="module")
def eager_server():
    server = ServerProcess("--engine", "hf-eager", "--model", "tiny-llama").wait_ready()
    yield server
    server.stop()


def test_score_is_finite_and_equal_without_and_with_cache(tiny_server, eager_server):
    text = "I've won an award today, I'm in a good mood"
    cached = tiny_server.stub.Score(pb.ScoreRequest(text=text), timeout=30)
    eager = eager_server.stub.Score(pb.ScoreRequest(text=text), timeout=30)
    assert 1 < cached.perplexity < 1e6 and cached.token_count > 5
    assert cached.total_logprob == pytest.approx(eager.total_logprob, rel=1e-5)
    greedy = dict(max_new_tokens=20, ignore_eos=True)
    assert tiny_server.generate(text, **greedy).token_ids == eager_server.generate(text, **greedy).token_ids


def test_cancel_mid_stream_stops_generation_and_frees_the_slot(tiny_server):
    cancelled_before = metric(tiny_server, "yayi_requests_total", status="CANCELLED")
    stream = tiny_server.stream("Tell me everything", max_new_tokens=900, ignore_eos=True)
    next(stream), next(stream)
    stream.cancel()
    assert wait_until(lambda: metric(tiny_server, "yayi_requests_running") == 0)
    tokens_after_cancel = metric(tiny_server, "yayi_generation_tokens_total")
    time.sleep(0.5)
    assert metric(tiny_server, "yayi_generation_tokens_total") == tokens_after_cancel, "work went on after cancel"
    assert metric(tiny_server, "yayi_requests_total", status="CANCELLED") == cancelled_before + 1
    assert tiny_server.generate("next", max_new_tokens=3, timeout=5).usage.completion_tokens == 3


@pytest.mark.parametrize(
    "prompt, params, field, limit",
    [
        ("", {}, "prompt", "empty"),
        ("  \t\n ", {}, "prompt", "whitespace"),
        ("word " * 1200, {}, "prompt is", "context is 1024 tokens"),
        ("hi", dict(temperature=-1.0), "temperature", "between 0"),
        ("hi", dict(temperature=float("nan")), "temperature", "finite"),
        ("hi", dict(temperature=float("inf")), "temperature", "finite"),
        ("hi", dict(temperature=2.5), "temperature", "between 0 (greedy) and 2"),
        ("hi", dict(top_p=0.0), "top_p", "(0, 1]"),
        ("hi", dict(top_p=-0.5), "top_p", "(0, 1]"),
        ("hi", dict(top_p=1.5), "top_p", "(0, 1]"),
        ("hi", dict(top_k=49153), "top_k", "vocabulary size 49152"),
        ("hi", dict(max_new_tokens=0), "max_new_tokens", "at least 1"),
        ("hi", dict(max_new_tokens=5000), "max_new_tokens", "context of 1024"),
        ("hi", dict(repetition_penalty=0.0), "repetition_penalty", "between 0.01 and 100"),
        ("hi", dict(repetition_penalty=-1.0), "repetition_penalty", "between 0.01 and 100"),
        ("hi", dict(repetition_penalty=1e-30), "repetition_penalty", "between 0.01 and 100"),
        ("hi", dict(stop=[""]), "stop", "empty"),
        ("hi", dict(stop=[f"s{i}" for i in range(1000)]), "stop", "at most 16"),
        ("hi", dict(stop=["word " * 1200]), "stop", "at most 256 characters"),  # longer than the context, too
        ("hi", dict(seed=2**63), "seed", "2^63"),
    ],
)
@pytest.mark.parametrize("call", ["unary", "stream"])
def test_bad_input_is_invalid_argument_naming_the_field(tiny_server, prompt, params, field, limit, call):
    invalid_before = metric(tiny_server, "yayi_requests_total", status="INVALID_ARGUMENT")
    with pytest.raises(grpc.RpcError) as error:
        if call == "unary":
            tiny_server.generate(prompt, **params)
        else:
            list(tiny_server.stream(prompt, **params))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details() and limit in error.value.details()
    assert metric(tiny_server, "yayi_requests_total", status="INVALID_ARGUMENT") == invalid_before + 1
    assert metric(tiny_server, "yayi_requests_running") + metric(tiny_server, "yayi_requests_waiting") == 0
    assert tiny_server.generate("still serving?", max_new_tokens=2).usage.completion_tokens == 2


def test_prompt_past_the_receive_limit_is_refused_before_it_is_read(tiny_server):
    refused_before = metric(tiny_server, "yayi_requests_total", status="RESOURCE_EXHAUSTED", method="Generate")
    with pytest.raises(grpc.RpcError) as error:
        tiny_server.generate("x" * 10 * 2**20, max_new_tokens=2)
    # grpc itself refuses it (--max-receive-mb, default 1): the message gives both sizes.
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in error.value.details() and str(2**20) in error.value.details()
    assert (
        metric(tiny_server, "yayi_requests_total", status="RESOURCE_EXHAUSTED", method="Generate") == refused_before + 1
    ), "the refusal must be counted"
    assert tiny_server.generate("still serving?", max_new_tokens=2).usage.completion_tokens == 2


@pytest.mark.parametrize(
    "prompt",
    [
        "请用中文回答：今天天气怎么样？",
        "🚀🌞👍🏽 emoji only 🎉",
        "Mixed: English, 中文, Ελληνικά, العربية, हिन्दी and 😀, all in one",
    ],
)
def test_non_latin_prompts_stream_valid_utf8_chunks(tiny_server, prompt):
    # Sampling on a random-weight model picks byte-level tokens freely: many characters get
    # split across tokens, which is where a chunk could carry half a character.
    params = dict(max_new_tokens=60, ignore_eos=True, temperature=1.0, seed=7)
    chunks = [pb.GenerateChunk.FromString(raw) for raw in raw_stream(tiny_server, request(prompt, **params))]
    for chunk in chunks:
        chunk.text.encode("utf-8")  # no lone surrogates; FromString already refused bad UTF-8
    assert chunks[-1].usage.completion_tokens == 60
    unary = tiny_server.generate(prompt, **params)
    assert "".join(c.text for c in chunks) == unary.text
    assert any(len(c.token_ids) > 1 for c in chunks), "no character was held back: the case was not exercised"


@pytest.fixture(scope="module")
def queued_server():
    """SmolLM2 on hf-kv, one request at a time and a queue of two.  Its occupants must outlast the test:
    tiny-llama streams a long answer in about a second, so a slot could free up between the check of the
    queue and the call meant to be refused; SmolLM2's 3000 tokens take minutes on any machine we run on."""
    server = ServerProcess(
        "--engine", "hf-kv", "--model", "smollm2-135m", "--max-concurrency", "1", "--max-queue", "2"
    ).wait_ready()
    yield server
    server.stop()


@pytest.mark.slow  # the real SmolLM2
def test_queue_full_is_resource_exhausted_at_once(queued_server):
    # One running, two waiting (--max-queue 2): the fourth call is refused without waiting.
    server = queued_server
    server.generate("measure", max_new_tokens=2)  # a service time, for the retry hint
    long = dict(max_new_tokens=3000, ignore_eos=True)
    streams = [server.stream("busy", **long) for _ in range(3)]
    next(streams[0])
    assert wait_until(lambda: metric(server, "yayi_requests_waiting") == 2, 10), "the queue never filled"
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        server.generate("one too many", max_new_tokens=2, timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue bound 2" in error.value.details()
    pushback = dict(error.value.trailing_metadata())["grpc-retry-pushback-ms"]
    assert int(pushback) > 0, "a measured service time gives the retry policy a wait"
    assert time.monotonic() - started < 5, "refusal must not wait for a slot"
    assert metric(server, "yayi_requests_running") == 1, "the occupant ended early: the case was not exercised"
    for stream in streams:
        stream.cancel()
    assert wait_until(
        lambda: metric(server, "yayi_requests_waiting") + metric(server, "yayi_requests_running") == 0, 10
    ), "cancelled requests kept their places"
    assert server.generate("free again", max_new_tokens=2, timeout=10).usage.completion_tokens == 2


def test_duplicate_live_request_id_is_refused(tiny_server):
    stream = tiny_server.stream("long", request_id="dup", max_new_tokens=900, ignore_eos=True)
    next(stream)
    with pytest.raises(grpc.RpcError) as error:
        tiny_server.generate("again", request_id="dup", max_new_tokens=2)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dup" in error.value.details()
    stream.cancel()


def test_deadline_shorter_than_generation(tiny_server):
    expired_before = metric(tiny_server, "yayi_requests_total", status="DEADLINE_EXCEEDED")
    assert_deadline_stops_the_work(tiny_server)
    assert metric(tiny_server, "yayi_requests_total", status="DEADLINE_EXCEEDED") == expired_before + 1


@pytest.mark.slow
def test_sigterm_drains_in_flight_then_exits_zero():
    # The grace period only bounds a hang: 300 tokens take about a second, but on a machine whose
    # cores are oversubscribed torch's OpenMP threads can slow a step a hundredfold.
    server = ServerProcess("--engine", "hf-kv", "--model", "tiny-llama", "--grace-period", "180").wait_ready()
    stream = server.stream("finish me", max_new_tokens=300, ignore_eos=True)
    chunks = [next(stream)]
    server.signal(signal.SIGTERM)
    server.wait_for_line("draining", 10)
    assert server.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as refused:
        server.generate("too late", max_new_tokens=2, timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    chunks.extend(stream)
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 300
    assert server.process.wait(60) == 0


def test_second_signal_exits_at_once():
    server = ServerProcess(
        "--engine", "hf-kv", "--model", "tiny-llama", "--metrics-port", "-1", "--grace-period", "60"
    ).wait_ready()
    stream = server.stream("never finished", max_new_tokens=900, ignore_eos=True)
    next(stream)
    server.signal(signal.SIGTERM)
    server.wait_for_line("draining", 10)
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.process.wait(10) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 5, "the second signal must not wait for the grace period"
    with pytest.raises(grpc.RpcError):
        list(stream)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--model", "no-such-model"], 1, "neither a built-in"),
        (["--engine", "no-such-engine"], 2, "invalid choice: 'no-such-engine'"),
    ],
)
def test_bad_startup_arguments_exit_with_a_message(args, code, message):
    run = run_cli(*args, timeout=120)
    assert run.returncode == code
    assert message in run.stderr
    assert "Traceback" not in run.stderr + run.stdout


def test_console_script_is_installed():
    script = shutil.which("yayi-serve") or str(ROOT / ".venv" / "bin" / "yayi-serve")
    run = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "--engine" in run.stdout and "hf-flash" in run.stdout
