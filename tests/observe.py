"""What tests read from a running server: a /metrics series, and waiting for a condition."""

from __future__ import annotations

import time

from loadtest import scrape
from loadtest.server_process import ServerProcess


def metric(server: ServerProcess, name: str, **labels) -> float:
    """Sum of the matching series; 0 before a labelled counter's first increment."""
    return (
        scrape.total(scrape.parse(scrape.fetch(f"http://127.0.0.1:{server.metrics_port}/metrics")), name, **labels)
        or 0.0
    )


def wait_until(condition, timeout: float = 5.0) -> bool:
    """Polls ``condition`` until it holds or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def idle(server: ServerProcess) -> bool:
    return metric(server, "yayi_requests_running") + metric(server, "yayi_requests_waiting") == 0
