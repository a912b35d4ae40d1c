"""The vllm engine's parallel layout checked before vLLM starts: thread binding, refusals, the Ray address.

No vLLM, no Ray, no model: the checks read plain numbers and a config's attributes.
"""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest

from engines.errors import EngineUnavailable
from engines.vllm import layout as vllm_layout
from engines.vllm import ray_cluster as vllm_ray
from engines.vllm.engine import VLLMOptions
from engines.vllm.layout import BIND_ENV, Layout, binding_for, bound_threads, check_cores, check_layout, thread_binding
from server.cli import build_parser, config_from_args

SMOLLM2 = SimpleNamespace(num_attention_heads=9, num_hidden_layers=30)
TINY_LLAMA = SimpleNamespace(num_attention_heads=2, num_hidden_layers=2)


@pytest.mark.parametrize(
    "cpus, ranks, binding",
    [
        ([0, 1], 2, "0|1"),
        ([0, 1], 1, "0-1"),
        ([0, 1, 2, 3], 2, "0-1|2-3"),
        ([0, 1, 2, 3, 4], 2, "0-1|2-3"),  # the odd core stays free for the server and vLLM's engine process
        ([3, 1, 2, 0], 4, "0|1|2|3"),
        ([0, 2, 4, 6], 2, "0,2|4,6"),  # an affinity mask with holes (taskset, a container's cpuset)
        ([8, 9, 10, 11, 12, 13], 3, "8-9|10-11|12-13"),
    ],
)
def test_thread_binding_gives_each_rank_an_equal_share(cpus, ranks, binding):
    assert thread_binding(cpus, ranks) == binding
    shares = [set(_expand(part)) for part in binding.split("|")]
    assert len(shares) == ranks and len({len(s) for s in shares}) == 1
    assert set().union(*shares) <= set(cpus) and sum(map(len, shares)) == len(set().union(*shares))


def _expand(part: str) -> list[int]:
    out: list[int] = []
    for piece in part.split(","):
        low, _, high = piece.partition("-")
        out.extend(range(int(low), int(high or low) + 1))
    return out


def test_thread_binding_refuses_more_ranks_than_cores():
    with pytest.raises(ValueError):
        thread_binding([0, 1], 3)


def test_more_ranks_than_cores_is_one_line_that_says_so():
    with pytest.raises(EngineUnavailable) as refused:
        check_cores(Layout(2, 2, "mp"), [0, 1])
    message = str(refused.value)
    assert "\n" not in message
    assert "4 worker processes" in message and "may use 2 (0-1)" in message and "ray" in message
    check_cores(Layout(1, 2, "mp"), [0, 1])  # fits


@pytest.mark.parametrize(
    "layout, config, says",
    [
        (Layout(2, 1), SMOLLM2, "must divide the model's 9 attention heads"),
        (Layout(4, 1), TINY_LLAMA, "use a size among 1, 2"),
        (Layout(1, 3), TINY_LLAMA, "more stages than the model's 2 layers"),
        (Layout(1, 1, "slurm"), TINY_LLAMA, "must be one of mp, ray"),
    ],
)
def test_layouts_that_cannot_work_are_refused_with_one_line(layout, config, says):
    with pytest.raises(EngineUnavailable, match=says) as refused:
        check_layout(layout, config, device="cpu", enforce_eager=None)
    assert "\n" not in str(refused.value)


def test_layouts_that_fit_pass():
    for layout in (Layout(1, 1), Layout(1, 2), Layout(3, 2, "ray"), Layout(3, 2), Layout(9, 1)):
        check_layout(layout, SMOLLM2, device="cpu", enforce_eager=None)
    check_layout(Layout(2, 1), TINY_LLAMA, device="cpu", enforce_eager=True)


def test_eager_pipeline_on_cpu_is_refused_but_not_on_cuda():
    with pytest.raises(EngineUnavailable, match="leave --enforce-eager at auto"):
        check_layout(Layout(1, 2), SMOLLM2, device="cpu", enforce_eager=True)
    check_layout(Layout(1, 2), SMOLLM2, device="cpu", enforce_eager=False)
    check_layout(Layout(1, 2), SMOLLM2, device="cuda", enforce_eager=True)


def test_binding_applies_to_cpu_mp_only(monkeypatch):
    monkeypatch.delenv(BIND_ENV, raising=False)
    monkeypatch.setattr(vllm_layout, "allowed_cpus", lambda: [0, 1])
    assert binding_for(Layout(1, 2, "mp"), "cpu") == "0|1"
    assert binding_for(Layout(2, 1, "mp"), "cpu") == "0|1"
    assert binding_for(Layout(1, 1, "mp"), "cpu") == "0-1"  # every core: vLLM's own would keep one back
    assert binding_for(Layout(1, 2, "ray"), "cpu") is None  # Ray's workers are placed by the cluster
    assert binding_for(Layout(1, 2, "mp"), "cuda") is None
    with pytest.raises(EngineUnavailable, match="4 worker processes"):
        binding_for(Layout(2, 2, "mp"), "cpu")


def test_a_binding_the_user_set_stands(monkeypatch):
    monkeypatch.setenv(BIND_ENV, "1|0")
    monkeypatch.setattr(vllm_layout, "allowed_cpus", lambda: [0])  # not even consulted
    assert binding_for(Layout(2, 2, "mp"), "cpu") is None


def test_the_binding_is_set_only_while_vllm_spawns(monkeypatch):
    monkeypatch.delenv(BIND_ENV, raising=False)
    import os

    with bound_threads("0|1"):
        assert os.environ[BIND_ENV] == "0|1"
    assert BIND_ENV not in os.environ
    with pytest.raises(RuntimeError), bound_threads("0|1"):
        raise RuntimeError("vLLM failed to start")
    assert BIND_ENV not in os.environ
    with bound_threads(None):
        assert BIND_ENV not in os.environ


def test_flags_reach_the_options():
    args = build_parser().parse_args(
        [
            "--engine",
            "vllm",
            "--pipeline-parallel-size",
            "2",
            "--distributed-executor-backend",
            "ray",
            "--ray-join-timeout",
            "5",
        ]
    )
    options = config_from_args(args).engine_options
    assert isinstance(options, VLLMOptions)
    assert options.layout == Layout(1, 2, "ray") and options.ray_join_timeout_s == 5
    assert VLLMOptions().layout == Layout(1, 1, "mp")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--engine", "vllm", "--distributed-executor-backend", "slurm"])
    with pytest.raises(SystemExit):
        config_from_args(build_parser().parse_args(["--engine", "vllm", "--pipeline-parallel-size", "0"]))


def test_describe_names_sizes_and_executor():
    assert Layout(2, 4, "ray").describe() == "TP 2 x PP 4 over ray" and Layout(2, 4).ranks == 8


# ---- the Ray cluster's address (engines/vllm/ray_cluster.py), before Ray is asked anything -----------


def test_no_address_leaves_the_cluster_to_vllm(monkeypatch):
    monkeypatch.delenv(vllm_ray.ADDRESS_ENV, raising=False)
    assert vllm_ray.wait_for_cluster(2, "CPU", timeout_s=0) is None


def test_an_address_nobody_answers_is_one_line_soon(monkeypatch):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    monkeypatch.setenv(vllm_ray.ADDRESS_ENV, f"127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(EngineUnavailable, match=f"no Ray cluster answers at RAY_ADDRESS=127.0.0.1:{port}") as refused:
        vllm_ray.wait_for_cluster(2, "CPU", timeout_s=0)
    assert time.monotonic() - started < 10 and "\n" not in str(refused.value)


def test_an_address_without_a_port_is_refused(monkeypatch):
    monkeypatch.setenv(vllm_ray.ADDRESS_ENV, "auto")
    with pytest.raises(EngineUnavailable, match="is not HOST:PORT"):
        vllm_ray.wait_for_cluster(2, "CPU", timeout_s=0)
