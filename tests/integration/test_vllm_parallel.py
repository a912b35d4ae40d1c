"""One model across processes and machines: the vllm engine's pipeline parallelism, for real.

Two stages of tiny-llama (one layer each) as vLLM's worker processes (``mp``), and as actors
on a real two-node Ray cluster that the fixture starts with Ray's own ``ray start`` (a head
and a second node, one CPU each, so each holds one stage) and stops afterwards.  Each serves,
streams and cancels through the server; a stage killed under load fails the calls in flight
with UNAVAILABLE within seconds and turns health NOT_SERVING; a new server serves again.
Layouts that cannot work end the start-up with one line that says why.

tiny-llama because the model is not the point here; the stages start compiled (vLLM's CPU
backend cannot pipeline eager, see engines/vllm/layout.py), which the compile cache in
``~/.cache/vllm`` makes quicker from the second start on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import psutil
import pytest

from loadtest.launch.ray_cluster import RayCluster
from loadtest.launch.server_process import ROOT, ServerProcess
from server.grpc.wire import pb
from tests.helpers.observe import dies_under_load, metric, wait_until
from tests.helpers.servers import run_cli

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

pytest.importorskip("vllm", reason="vllm is installed by `make venv`; this skip only shows where it is not")
pytest.importorskip("ray", reason="ray is installed by `make venv` (the ray extra)")

MODEL = "tiny-llama"
PP2 = ("--engine", "vllm", "--model", MODEL, "--pipeline-parallel-size", "2", "--max-concurrency", "4")
RAY = ("--distributed-executor-backend", "ray")
READY_S = 600
# A stage's death reaches the calls in flight within this (vLLM's worker monitors poll every few seconds).
DEAD_WITHIN_S = 30
PROMPT = "The pipeline carries"
# Greedy tokens per layout, so the Ray layout can be held to what mp gave on the same weights.
GREEDY: dict[str, list[int]] = {}


def layout_of(server: ServerProcess) -> str:
    return server.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10).attention


def greedy_ids(server: ServerProcess) -> list[int]:
    return list(server.generate(PROMPT, max_new_tokens=16, ignore_eos=True).token_ids)


def engine_info_label(server: ServerProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    (line,) = [line for line in text.splitlines() if line.startswith("yayi_engine_info{")]
    return line


def streams_and_cancels(server: ServerProcess) -> None:
    chunks = list(server.stream(PROMPT, max_new_tokens=12, ignore_eos=True))
    assert chunks[-1].finish_reason == "length" and sum(len(c.token_ids) for c in chunks) == 12
    stream = server.stream("go on and on", max_new_tokens=900, ignore_eos=True)
    next(stream), next(stream)
    assert metric(server, "yayi_requests_running") == 1
    stream.cancel()
    assert wait_until(lambda: metric(server, "yayi_requests_running") == 0, timeout=10)
    assert server.generate("next", max_new_tokens=2, timeout=30).usage.completion_tokens == 2


def stage_processes(root: psutil.Process) -> list[psutil.Process]:
    """vLLM's workers under ``root`` by title: ``VLLM::Worker_PP1`` (mp), ``ray::CPURayWorkerProc.run`` (Ray)."""
    found = []
    for process in root.children(recursive=True):
        try:
            if any(title in " ".join(process.cmdline()) for title in ("Worker_PP", "RayWorkerProc")):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


# ---- pipeline stages as vLLM's worker processes (mp) ---------------------------------------


@pytest.fixture(scope="module")
def mp_server():
    server = ServerProcess(*PP2, "--http-port", "0").wait_ready(READY_S)
    yield server
    server.stop()


def test_mp_pipeline_binds_threads_and_reports_its_layout(mp_server):
    layout = layout_of(mp_server)
    assert layout.startswith("vllm paged attention: ")
    assert "; TP 1 x PP 2 over mp: 2 ranks in 2 processes on 1 machine" in layout
    if not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        # One share of this machine's cores per rank, as the start-up log says.
        assert any("threads bound per rank" in line for line in mp_server.lines)
        assert ", threads bound " in layout
    assert f'attention="{layout}"' in engine_info_label(mp_server)
    assert len(stage_processes(psutil.Process(mp_server.process.pid))) == 2


def test_mp_pipeline_serves_streams_and_cancels(mp_server):
    GREEDY["mp"] = greedy_ids(mp_server)
    assert len(GREEDY["mp"]) == 16
    streams_and_cancels(mp_server)


def test_mp_killed_stage_fails_calls_and_health(mp_server):
    # A restart serving again is shown once, on Ray below, where the cluster outlives the server:
    # a second PP 2 start here would cost the suite about 35 s for the same path.
    (last,) = [
        p for p in stage_processes(psutil.Process(mp_server.process.pid)) if "Worker_PP1" in " ".join(p.cmdline())
    ]
    dies_under_load(mp_server, lambda: last.send_signal(signal.SIGKILL), DEAD_WITHIN_S)
    assert mp_server.process.poll() is None, "the server stays up, so probes and logs can say why"


# ---- pipeline stages on a two-node Ray cluster ---------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = RayCluster().start()
    yield cluster
    cluster.stop()
    assert not cluster.running()


@pytest.fixture(scope="module")
def ray_server(ray_cluster):
    server = ServerProcess(*PP2, *RAY, "--http-port", "0", env={"RAY_ADDRESS": ray_cluster.address})
    server.wait_ready(READY_S)
    yield server
    server.stop()


def test_ray_cluster_has_two_nodes_of_one_cpu(ray_cluster):
    status = ray_cluster.status()
    assert status.count(" 1 node_") == 2 and "/2.0 CPU" in status


def test_ray_pipeline_puts_one_stage_on_each_node(ray_cluster, ray_server):
    layout = layout_of(ray_server)
    assert "; TP 1 x PP 2 over ray: 2 ranks in 2 processes on 2 Ray nodes" in layout
    assert f'attention="{layout}"' in engine_info_label(ray_server)
    # Each node's own raylet runs one of the stages.
    for node in ("head", "worker1"):
        assert len(stage_processes(ray_cluster.node(node))) == 1, node
    assert any("Ray cluster at" in line and "2 nodes, 2 CPUs" in line for line in ray_server.lines)


def test_ray_pipeline_serves_streams_and_cancels_as_mp_does(ray_server):
    ids = greedy_ids(ray_server)
    assert len(ids) == 16
    if "mp" in GREEDY:
        assert ids == GREEDY["mp"], "the same stages, the same greedy tokens, whichever executor runs them"
    streams_and_cancels(ray_server)
    assert greedy_ids(ray_server) == ids


def test_more_ranks_than_the_cluster_holds_is_one_line(ray_cluster):
    run = run_cli(
        *PP2,
        *RAY,
        "--tensor-parallel-size",
        "2",
        "--ray-join-timeout",
        "0",
        timeout=120,
        env={**os.environ, "RAY_ADDRESS": ray_cluster.address},
    )
    assert run.returncode == 1
    assert one_error_line(run) == (
        f"yayi-serve: error: the Ray cluster at {ray_cluster.address}: 2 nodes, 2 CPUs, and 4 ranks need one CPU "
        f"each; start more nodes with `ray start --address={ray_cluster.address}`, or lower the sizes "
        "(waited 0 s, --ray-join-timeout)"
    )


def test_ray_killed_stage_fails_calls_and_health_and_a_restart_serves(ray_cluster, ray_server):
    ids = greedy_ids(ray_server)
    # The stage on the second node: as if that machine's worker process died.
    (remote,) = stage_processes(ray_cluster.node("worker1"))
    dies_under_load(ray_server, lambda: remote.send_signal(signal.SIGKILL), DEAD_WITHIN_S)
    ray_server.stop()
    # The cluster outlives the server: a new one places its stages there again.
    again = ServerProcess(*PP2, *RAY, env={"RAY_ADDRESS": ray_cluster.address}).wait_ready(READY_S)
    try:
        assert greedy_ids(again) == ids
        assert "on 2 Ray nodes" in layout_of(again)
    finally:
        code = again.stop()
    # Drained, not killed (-15): no Ray driver's native SIGTERM handler in the server's process.
    assert code == 0, "SIGTERM drains the server and ends it cleanly"
    # Its stages go with it: the cluster is left as it was found.
    nodes = [ray_cluster.node(name) for name in ("head", "worker1")]
    assert wait_until(lambda: not any(stage_processes(node) for node in nodes), timeout=30)


# ---- layouts that cannot work ----------------------------------------------------------------


def one_error_line(run: subprocess.CompletedProcess) -> str:
    errors = [line for line in run.stderr.splitlines() if line.startswith("yayi-serve: error:")]
    assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    return errors[0]


ONE_CORE = min(os.sched_getaffinity(0))
# Each refusal, and what its one line must say. Each is a start-up that imports torch and vLLM
# (seconds); they run side by side.
REFUSALS = {
    "tp-not-dividing-heads": (
        ("--model", "smollm2-135m", "--tensor-parallel-size", "2"),
        "--tensor-parallel-size 2 must divide the model's 9 attention heads (each rank takes an equal share); "
        "use a size among 1, 3, 9",
    ),
    "more-stages-than-layers": (
        ("--model", MODEL, "--pipeline-parallel-size", "3"),
        "more stages than the model's 2 layers",
    ),
    "eager-pipeline-on-cpu": (
        ("--model", MODEL, "--pipeline-parallel-size", "2", "--enforce-eager", "true"),
        "leave --enforce-eager at auto",
    ),
    # Pinned to one core, as a container's cpuset or taskset would: two stages cannot each have one.
    "more-processes-than-cores": (
        PP2[2:],
        "yayi-serve: error: TP 1 x PP 2 = 2 worker processes need a CPU core each, and this process may use 1 "
        f"({ONE_CORE}); lower the sizes, or run the stages on more machines with --distributed-executor-backend ray",
    ),
}


@pytest.fixture(scope="module")
def refusals() -> dict[str, subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_OMP_THREADS_BIND"}
    started = {
        name: subprocess.Popen(
            [sys.executable, "-m", "server.cli", "--port", "0", "--metrics-port", "-1", "--engine", "vllm", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=(lambda: os.sched_setaffinity(0, {ONE_CORE})) if name == "more-processes-than-cores" else None,
        )
        for name, (args, _) in REFUSALS.items()
    }
    done = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=180)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return done


@pytest.mark.parametrize("name", list(REFUSALS))
def test_layouts_that_cannot_work_end_start_up_with_one_line(refusals, name):
    run, says = refusals[name], REFUSALS[name][1]
    assert run.returncode == 1
    line = one_error_line(run)
    assert line == says if says.startswith("yayi-serve: error:") else says in line
