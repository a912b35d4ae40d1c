"""Servers that tests start as processes: a fixture's server, and the command line run to its exit."""

from __future__ import annotations

import subprocess
import sys

from loadtest.launch.server_process import ROOT, ServerProcess

# The engine most tests serve, on the model that loads in a second.
TINY_KV = ("--engine", "hf-kv", "--model", "tiny-llama")


def served(*args: str, ready_s: float = 240.0, **options):
    """A fixture's body (``yield from served(...)``): the server, ready, then stopped when the fixture ends."""
    server = ServerProcess(*args, **options).wait_ready(ready_s)
    yield server
    server.stop()


def run_cli(*args: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """``yayi-serve`` run to its exit, with its output kept; on port 0 and without metrics, so runs never clash."""
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "--port", "0", "--metrics-port", "-1", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
