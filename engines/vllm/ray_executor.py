"""vLLM's Ray executor (``RayExecutorV2``) with what vLLM 0.32 lacks for this server: a stage's death
that fails the engine instead of hanging it, and a CPU platform Ray can place.

**A dead stage on another node hangs the engine.**  vLLM's Ray monitor sees an actor die within
seconds, shuts the executor down and queues EXECUTOR_FAILED for the engine core; but the core's
busy loop is then blocked reading the last stage's reply, and for a worker on another node that
read is a ZeroMQ poll without a timeout (``MessageQueue.recv``, vllm/distributed/device_communicators/
shm_broadcast.py), which the executor's shutdown does not wake.  The calls in flight wait for their
deadlines and health stays SERVING.  ``RayExecutor`` reads those replies in slices of
``READ_SLICE_S`` and gives up once the executor is shutting down, so the core fails, vLLM reports
the engine dead, and the server answers UNAVAILABLE and turns NOT_SERVING.

**vLLM's CPU build refuses Ray** at once: its CPU platform names no Ray resource
(``CpuPlatform.ray_device_key`` is the base class's "", vllm/platforms/interface.py), so
``initialize_ray_cluster`` (vllm/v1/executor/ray_utils.py, line 574 in 0.32.0) raises "current
platform cpu does not support ray".  ``CPURayExecutor`` supplies the three missing pieces; the rest
is vLLM's own, unchanged (a placement group of one bundle per rank, a ``RayWorkerProc`` actor per
rank running vLLM's CPUWorker, its message queues, gloo between the stages):

- the CPU platform's Ray resource is ``"CPU"``: each rank's bundle reserves one CPU of a node, so
  nodes started with ``--num-cpus 1`` hold one stage each;
- the actors ask for nothing beyond their bundle; vLLM would ask for ``resources={"CPU": 1}``, which
  Ray refuses (CPUs are ``num_cpus``);
- a worker reports no accelerator ids: a CPU has none, and Ray's accelerator table has no "CPU".

vLLM's engine process imports this module when it unpickles its config (the executor class
travels by name), and each Ray worker when it unpickles its actor class, so the changes are made
in those processes only.  These are the only reaches into vLLM's private surface for Ray, checked
against vLLM 0.32.0 (``CHECKED_VERSION``); the engine does not use them on another version.
"""

from __future__ import annotations

import time
from typing import Any

import ray
import vllm
from vllm.platforms.cpu import CpuPlatform
from vllm.v1.executor import ray_executor_v2

CHECKED_VERSION = "0.32."
# How often a blocked read of a remote stage's reply looks whether the executor has shut down.
READ_SLICE_S = 0.5


def version_supported() -> bool:
    return vllm.__version__.startswith(CHECKED_VERSION)


class RayExecutor(ray_executor_v2.RayExecutorV2):
    def _init_executor(self) -> None:
        super()._init_executor()
        for queue in self.response_mqs:
            if queue._is_remote_reader:
                queue.dequeue = _dequeue_until_shutdown(queue)  # type: ignore[method-assign]


def _dequeue_until_shutdown(queue):
    """``queue.dequeue`` for a reader on another node, woken by the executor's shutdown."""
    whole = queue.dequeue

    def dequeue(timeout: float | None = None, indefinite: bool = False):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = READ_SLICE_S if deadline is None else min(READ_SLICE_S, max(0.0, deadline - time.monotonic()))
            if queue.remote_socket.poll(timeout=int(left * 1000)):
                return whole(timeout=0)
            if queue.shutting_down:
                raise RuntimeError("a Ray worker of this engine died; the executor has shut down")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError

    return dequeue


class CPURayWorkerProc(ray_executor_v2.RayWorkerProc):
    def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
        return ray.get_runtime_context().get_node_id(), []


class CPURayExecutor(RayExecutor):
    @staticmethod
    def _get_actor_resource_kwargs() -> dict[str, Any]:
        return {"num_gpus": 0}

    def _init_executor(self) -> None:
        # Read by initialize_ray_cluster (the bundles' resource) in this, the engine process.
        CpuPlatform.ray_device_key = "CPU"
        # _init_executor makes its actors from the module's RayWorkerProc by name.
        ray_executor_v2.RayWorkerProc = CPURayWorkerProc  # type: ignore[misc]
        super()._init_executor()
