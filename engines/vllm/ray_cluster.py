"""The Ray cluster the vllm engine's ``--distributed-executor-backend ray`` runs its stages on.

vLLM's engine process joins a cluster with ``ray.init()``, which reads ``RAY_ADDRESS``; the
cluster itself is Ray's own (``ray start --head`` on one machine, ``ray start
--address=HEAD:PORT`` on the others, ``make ray-cluster`` here).  Before vLLM starts, this
module looks at that cluster: that it answers, and that it has one device per rank (GPUs on
CUDA, CPUs on a CPU).  Workers that are still joining are waited for, up to
``--ray-join-timeout``; past that the start-up fails with one line naming what is missing,
instead of vLLM waiting for its placement group for half an hour.

Ray's client runs in a child process (``python -m engines.vllm.ray_cluster``), never in the server's.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from engines.errors import EngineUnavailable
from engines.vllm.layout import counted

log = logging.getLogger(__name__)

ADDRESS_ENV = "RAY_ADDRESS"
POLL_S = 2.0
# Ray's driver retries an address that does not answer for minutes; a socket says so at once.
CONNECT_TIMEOUT_S = 3.0
# Beyond the wait itself, for the child to import Ray and connect.
CHILD_MARGIN_S = 60.0


@dataclass(frozen=True)
class ClusterView:
    address: str
    nodes: int
    devices: float
    resource: str

    def describe(self) -> str:
        return f"Ray cluster at {self.address}: {counted(self.nodes, 'node')}, {counted(self.devices, self.resource)}"


def ray_address() -> str | None:
    return os.environ.get(ADDRESS_ENV) or None


def check_installed() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise EngineUnavailable(
            "--distributed-executor-backend ray needs Ray: `pip install 'ray==2.60.*'` "
            "(the `ray` extra; `make venv` installs it)"
        ) from None


def wait_for_cluster(ranks: int, resource: str, timeout_s: float) -> ClusterView | None:
    """The cluster at ``RAY_ADDRESS`` once it holds ``ranks`` of ``resource``; None without an address.

    Blocking: call it off the event loop.  Ray is asked from a child process: a Ray driver
    installs its own handlers for SIGTERM in native code, and they would stay in the server's
    process after ``ray.shutdown()``, so that a SIGTERM would kill it instead of draining it.
    """
    address = ray_address()
    if address is None:
        log.info(
            "vllm: %s is not set: vLLM's ray.init() joins whatever cluster Ray finds by itself, or starts a "
            "one-machine instance of its own; set it to the head's HOST:PORT to choose",
            ADDRESS_ENV,
        )
        return None
    deadline = time.monotonic() + timeout_s
    _wait_for_answer(address, deadline)
    left = max(0.0, deadline - time.monotonic())
    command = [sys.executable, "-m", __name__, address, resource, str(ranks), f"{left:.1f}"]
    # The child's stderr is the server's: its "waiting" lines and Ray's own say what it sees.
    run = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=left + CHILD_MARGIN_S)
    if run.returncode != 0:
        raise EngineUnavailable(f"could not read the Ray cluster at {address} (the lines above say why)")
    nodes, devices = json.loads(run.stdout)
    view = ClusterView(address, int(nodes), float(devices), resource)
    if view.devices < ranks:
        raise EngineUnavailable(
            f"the {view.describe()}, and {ranks} ranks need one {resource} each; start more nodes "
            f"with `ray start --address={address}`, or lower the sizes (waited {timeout_s:g} s, --ray-join-timeout)"
        )
    return view


def _watch(address: str, resource: str, ranks: int, wait_s: float) -> tuple[int, float]:
    """In the child: the cluster's live nodes and ``resource``, once it holds ``ranks`` or ``wait_s`` has passed."""
    import ray

    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        deadline = time.monotonic() + wait_s
        said = 0.0
        while True:
            nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
            devices = float(ray.cluster_resources().get(resource, 0))
            now = time.monotonic()
            if devices >= ranks or now >= deadline:
                return nodes, devices
            if now - said >= 10:
                view = ClusterView(address, nodes, devices, resource)
                print(
                    f"vllm: waiting for nodes to join the {view.describe()}; {ranks} ranks need as many",
                    file=sys.stderr,
                )
                said = now
            time.sleep(POLL_S)
    finally:
        ray.shutdown()


def _wait_for_answer(address: str, deadline: float) -> None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit():
        raise EngineUnavailable(f"{ADDRESS_ENV}={address!r} is not HOST:PORT (the head's `ray start --port`)")
    while True:
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise EngineUnavailable(
                    f"no Ray cluster answers at {ADDRESS_ENV}={address} ({exc.strerror or exc}); start its head "
                    f"with `ray start --head --port={port}` (or `make ray-cluster`)"
                ) from None
        time.sleep(POLL_S)


if __name__ == "__main__":
    address, resource, ranks, wait_s = sys.argv[1:5]
    print(json.dumps(_watch(address, resource, int(ranks), float(wait_s))))
