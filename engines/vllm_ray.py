"""The Ray cluster the vllm engine's ``--distributed-executor-backend ray`` runs its stages on.

vLLM's engine process joins a cluster with ``ray.init()``, which reads ``RAY_ADDRESS``; the
cluster itself is Ray's own (``ray start --head`` on one machine, ``ray start
--address=HEAD:PORT`` on the others, ``make ray-cluster`` here).  Before vLLM starts, this
module looks at that cluster from the server's process: that it answers, and that it has one
device per rank (GPUs on CUDA, CPUs on a CPU).  Workers that are still joining are waited for,
up to ``--ray-join-timeout``; past that the start-up fails with one line naming what is missing,
instead of vLLM waiting for its placement group for half an hour.

Ray is imported only here, only for this engine and backend.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

from .errors import EngineUnavailable
from .vllm_layout import counted

log = logging.getLogger(__name__)

ADDRESS_ENV = "RAY_ADDRESS"
POLL_S = 2.0
# Ray's driver retries an address that does not answer for minutes; a socket says so at once.
CONNECT_TIMEOUT_S = 3.0


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

    Blocking (Ray's client is): call it off the event loop.
    """
    address = ray_address()
    if address is None:
        log.info(
            "vllm: %s is not set, so vLLM's ray.init() joins the cluster `ray start` last started on this "
            "machine, or starts a one-machine instance of its own",
            ADDRESS_ENV,
        )
        return None
    deadline = time.monotonic() + timeout_s
    _wait_for_answer(address, deadline)
    import ray

    # A driver for a moment only: vLLM's engine process is the one that keeps the cluster's actors.
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        said = 0.0
        while True:
            nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
            devices = float(ray.cluster_resources().get(resource, 0))
            view = ClusterView(address, nodes, devices, resource)
            if devices >= ranks:
                return view
            now = time.monotonic()
            if now >= deadline:
                raise EngineUnavailable(
                    f"the {view.describe()}, and {ranks} ranks need one {resource} each; start more nodes "
                    f"with `ray start --address={address}`, or lower the sizes "
                    f"(waited {timeout_s:g} s, --ray-join-timeout)"
                )
            if now - said >= 10:
                log.info("vllm: waiting for nodes to join the %s; %d ranks need as many", view.describe(), ranks)
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
