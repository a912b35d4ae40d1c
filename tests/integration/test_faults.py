"""Faults inside the engine and outside the server: injected step errors, out-of-memory, a
dead device, a client process killed mid-stream.  Each proves the server keeps serving,
frees the slot and counts the failure; the fault hook is engines/faults.py."""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from engines import EngineConfig, SamplingParams, create_engine, faults
from engines.errors import EngineOutOfMemory
from loadtest.launch.server_process import ROOT, ServerProcess
from tests.helpers.observe import idle, metric, wait_until
from tests.helpers.servers import TINY_KV, run_cli, served

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
FAULTS = "error:FAULT-ERROR@2,oom:FAULT-OOM@1,fatal:FAULT-FATAL@1"


@pytest.fixture(scope="module")
def fault_server():
    """Two requests at once, so a failing request can share the engine with a healthy one."""
    yield from served(
        *TINY_KV, "--max-concurrency", "2", "--max-queue", "4", "--allow-test-faults", env={faults.ENV_VAR: FAULTS}
    )


class Bystander:
    """A long healthy stream running beside the faulty request; it must finish untouched."""

    def __init__(self, server: ServerProcess, tokens: int = 150) -> None:
        self.tokens = tokens
        self.chunks: list = []
        self._stream = server.stream("a bystander", max_new_tokens=tokens, ignore_eos=True, timeout=120)
        self.chunks.append(next(self._stream))
        self._thread = threading.Thread(target=lambda: self.chunks.extend(self._stream))
        self._thread.start()

    def finished_intact(self) -> bool:
        self._thread.join(120)
        last = self.chunks[-1]
        return last.finish_reason == "length" and last.usage.completion_tokens == self.tokens


@pytest.mark.parametrize("call", ["unary", "stream"])
def test_exception_in_an_engine_step_fails_only_that_request(fault_server, call):
    internal_before = metric(fault_server, "yayi_requests_total", status="INTERNAL")
    bystander = Bystander(fault_server)
    with pytest.raises(grpc.RpcError) as error:
        if call == "unary":
            fault_server.generate("FAULT-ERROR please", max_new_tokens=50)
        else:
            stream = fault_server.stream("FAULT-ERROR please", max_new_tokens=50)
            assert next(stream).token_ids, "the fault is at step 2: tokens were streamed before it"
            list(stream)
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert "InjectedFault" in error.value.details() and "server log" in error.value.details()
    assert bystander.finished_intact()
    assert metric(fault_server, "yayi_requests_total", status="INTERNAL") == internal_before + 1
    assert wait_until(lambda: idle(fault_server)), "the failed request's slot was not freed"
    assert fault_server.health_status() == SERVING
    assert fault_server.generate("after the fault", max_new_tokens=3).usage.completion_tokens == 3


def test_out_of_memory_is_resource_exhausted_and_serving_goes_on(fault_server):
    exhausted_before = metric(fault_server, "yayi_requests_total", status="RESOURCE_EXHAUSTED")
    bystander = Bystander(fault_server)
    with pytest.raises(grpc.RpcError) as error:
        list(fault_server.stream("FAULT-OOM now", max_new_tokens=50))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of memory" in error.value.details()
    assert bystander.finished_intact()
    assert metric(fault_server, "yayi_requests_total", status="RESOURCE_EXHAUSTED") == exhausted_before + 1
    assert wait_until(lambda: idle(fault_server))
    assert any("cache freed, serving on" in line for line in fault_server.lines)
    assert fault_server.health_status() == SERVING
    assert fault_server.generate("after the oom", max_new_tokens=3).usage.completion_tokens == 3


def test_killed_client_process_stops_the_generation_and_frees_the_slot(tiny_server):
    cancelled_before = metric(tiny_server, "yayi_requests_total", status="CANCELLED")
    client = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import time, grpc\n"
                "from loadtest.launch.server_process import request\n"
                "from server.grpc.wire import pb_grpc\n"
                f"stub = pb_grpc.InferenceStub(grpc.insecure_channel({tiny_server.address!r}))\n"
                "stream = stub.GenerateStream(request('killed mid-stream', max_new_tokens=900, ignore_eos=True))\n"
                "next(stream); print('streaming', flush=True); time.sleep(300)\n"
            ),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout.readline().strip() == "streaming"
        assert metric(tiny_server, "yayi_requests_running") == 1
        client.send_signal(signal.SIGKILL)
        client.wait(10)
    finally:
        client.kill()
    assert wait_until(lambda: metric(tiny_server, "yayi_requests_running") == 0), "the dead client's slot is held"
    tokens = metric(tiny_server, "yayi_generation_tokens_total")
    time.sleep(0.5)
    assert metric(tiny_server, "yayi_generation_tokens_total") == tokens, "generation went on for a dead client"
    assert metric(tiny_server, "yayi_requests_total", status="CANCELLED") == cancelled_before + 1
    assert tiny_server.generate("next", max_new_tokens=3, timeout=10).usage.completion_tokens == 3


def test_out_of_memory_frees_the_request_cache(loop):
    """In process, where the KV caches alive can be counted: none may outlive the failed request."""
    from transformers import DynamicCache

    engine = create_engine("hf-kv", EngineConfig(model="tiny-llama", test_faults=faults.parse("oom:FAULT-OOM@3")))
    loop.run(engine.start())

    async def generate(prompt):
        return [o async for o in engine.generate(prompt, SamplingParams(max_new_tokens=20), "r")]

    try:
        with pytest.raises(EngineOutOfMemory, match="out of memory"):
            loop.run(generate("FAULT-OOM " * 50))
        # No gc.collect() here: the engine must free the cache itself, as it must before
        # torch.cuda.empty_cache() can hand the memory back.
        assert [o for o in gc.get_objects() if type(o) is DynamicCache] == []
        assert engine.out_of_memory_count == 1 and engine.healthy
        assert loop.run(generate("fine"))[-1].completion_tokens == 20
    finally:
        loop.run(engine.shutdown())


def test_unrecoverable_engine_fault_turns_health_not_serving(fault_server):
    """Last on this server: the engine stays failed until a restart."""
    with pytest.raises(grpc.RpcError) as error:
        fault_server.generate("FAULT-FATAL now", max_new_tokens=20)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "restart the server" in error.value.details()
    assert fault_server.health_status() == NOT_SERVING, "health must flip before the failed call's error leaves"
    assert fault_server.health_status("yayi.serving.v1.Inference") == NOT_SERVING
    with pytest.raises(grpc.RpcError) as later:
        fault_server.generate("anyone there?", max_new_tokens=2)
    assert later.value.code() == grpc.StatusCode.UNAVAILABLE and "cannot recover" in later.value.details()
    assert fault_server.process.poll() is None, "the server stays up so probes and logs can say why"
    fault_server.signal(signal.SIGTERM)
    assert fault_server.process.wait(30) == 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="CUDA only: the real device running out of memory")
def test_real_cuda_out_of_memory_hands_the_memory_back(loop):
    """The oom fault on CUDA fills the device until its allocator refuses (engines/hf/engine.py)."""
    import torch

    engine = create_engine(
        "hf-kv", EngineConfig(model="tiny-llama", device="cuda", test_faults=faults.parse("oom:FAULT-OOM@2"))
    )
    loop.run(engine.start())

    async def generate(prompt):
        return [o async for o in engine.generate(prompt, SamplingParams(max_new_tokens=20), "r")]

    try:
        torch.cuda.synchronize()
        reserved_before = torch.cuda.memory_reserved()
        with pytest.raises(EngineOutOfMemory, match="out of memory"):
            loop.run(generate("FAULT-OOM on the device"))
        torch.cuda.synchronize()
        assert torch.cuda.memory_reserved() <= reserved_before + 2**26
        free, total = torch.cuda.mem_get_info()
        assert free > total / 2, "the device memory was not handed back"
        assert loop.run(generate("fine"))[-1].completion_tokens == 20
    finally:
        loop.run(engine.shutdown())


def test_fault_variable_without_the_test_flag_refuses_to_start():
    """A stray YAYI_TEST_FAULTS in production must not hand every client a switch that breaks the engine."""
    import os

    result = run_cli(*TINY_KV, env={**os.environ, faults.ENV_VAR: "error:X"}, timeout=60)
    assert result.returncode != 0
    assert "--allow-test-faults" in result.stderr and faults.ENV_VAR in result.stderr
