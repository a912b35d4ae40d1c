"""A real two-node Ray cluster on this machine, for the tests and benchmarks of ``--distributed-executor-backend ray``.

It runs the script ``make ray-cluster`` runs (scripts/ray_cluster.sh: Ray's own ``ray start --head``
and ``ray start --address``, one CPU per node), in a folder of its own and on a block of free
ports, so it never meets a cluster someone else started.  ``stop`` ends exactly the nodes it
started, by their pids.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from loadtest import ROOT

SCRIPT = ROOT / "scripts" / "ray_cluster.sh"
NODES = ("head", "worker1")


class RayCluster:
    def __init__(self, folder: str | None = None, port: int | None = None) -> None:
        # Short: Ray's Unix sockets live under it, and their paths may not pass 107 bytes.
        self._made_folder = folder is None
        self.folder = Path(folder or tempfile.mkdtemp(prefix="yayi-ray-", dir="/tmp"))
        self.port = port or free_port_base()
        self.address = f"127.0.0.1:{self.port}"
        self._pids: dict[str, int] = {}
        self._env = {**os.environ, "RAY_HEAD_PORT": str(self.port), "RAY": str(Path(sys.executable).parent / "ray")}

    def _run(self, action: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(SCRIPT), action, str(self.folder)],
            cwd=ROOT,
            env=self._env,
            capture_output=True,
            text=True,
            timeout=240,
        )

    def start(self) -> RayCluster:
        run = self._run("start")
        if run.returncode != 0 or run.stdout.strip() != f"export RAY_ADDRESS={self.address}":
            raise RuntimeError(f"ray cluster did not start ({run.returncode}):\n{run.stdout}{run.stderr}")
        self._pids = {name: int((self.folder / f"{name}.pid").read_text()) for name in NODES}
        return self

    def stop(self) -> None:
        """Ends the nodes; a folder this made goes too (Ray's session logs), once they have stopped."""
        run = self._run("stop")
        if run.returncode != 0:
            raise RuntimeError(f"ray cluster did not stop ({run.returncode}):\n{run.stderr}")
        if self._made_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def status(self) -> str:
        """Ray's own ``ray status`` for this cluster."""
        run = self._run("status")
        if run.returncode != 0:
            raise RuntimeError(f"ray status failed ({run.returncode}):\n{run.stderr}")
        return run.stdout

    def running(self) -> bool:
        """Whether any node this started is still up."""
        for pid in self._pids.values():
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return True
            except psutil.NoSuchProcess:
                continue
        return False

    def node(self, name: str) -> psutil.Process:
        """A node's ``ray start --block`` process: its raylet, and the workers the raylet starts, run beneath it."""
        return psutil.Process(self._pids[name])


def free_port_base() -> int:
    """A head port whose neighbours (every port scripts/ray_cluster.sh derives from it) are all free."""
    for _ in range(50):
        base = random.randrange(20000, 40000, 10)
        if all(_free(port) for port in (*range(base, base + 20), *range(base + 100, base + 200))):
            return base
    raise RuntimeError("no free block of ports for a Ray cluster")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True
