"""What an operator sees: a real Prometheus scraping a real server, the dashboard's queries run against it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from loadtest.launch.server_process import ROOT, ServerProcess

pytestmark = pytest.mark.slow

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "yayi-serve.json"
RATE_WINDOW_S = 10
LOAD_SECONDS = 24
# Series that exist only where power can be read (NVML, RAPL); this VM has neither.
POWER_METRICS = ("yayi_device_power_watts", "yayi_energy_joules_total")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_exprs() -> list[str]:
    found: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str) and node["expr"].strip():
                found.append(node["expr"])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(json.loads(DASHBOARD.read_text()))
    return found


class Prometheus:
    def __init__(self, tmp: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        assert binary, "the Debian package `prometheus` is missing: `make test` installs it (make prometheus)"
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: yayi-serve\n    static_configs:\n      - targets: ['{target}']\n"
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("prometheus did not become ready")

    def query(self, expr: str, at: float | None = None) -> dict:
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}"
        try:
            return json.loads(urllib.request.urlopen(url, timeout=10).read())
        except urllib.error.HTTPError as error:
            return json.loads(error.read())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(20)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    server = ServerProcess("--engine", "hf-kv", "--model", "tiny-llama").wait_ready()
    prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{server.metrics_port}")
    token_times: list[float] = []
    stop = threading.Event()

    def steady_load():
        while not stop.is_set():
            for chunk in server.stream("Keep talking about the weather", max_new_tokens=64, ignore_eos=True):
                token_times.extend([time.time()] * len(chunk.token_ids))

    worker = threading.Thread(target=steady_load)
    load_started = time.time()
    worker.start()
    time.sleep(LOAD_SECONDS)
    load_ended = time.time()
    time.sleep(3)  # a few scrapes while the load still runs
    stop.set()
    worker.join(60)
    yield server, prometheus, token_times, (load_started, load_ended)
    prometheus.stop()
    server.stop()


def test_prometheus_scrapes_the_server(stack):
    _, prometheus, _, _ = stack
    result = prometheus.query('up{job="yayi-serve"}')
    assert result["status"] == "success" and result["data"]["result"][0]["value"][1] == "1"


def test_every_dashboard_expression_returns_data(stack):
    server, prometheus, _, _ = stack
    exprs = dashboard_exprs()
    assert len(exprs) >= 10, "the dashboard should have a query per panel"
    exported = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    power_exported = "yayi_device_power_watts{" in exported
    failures = []
    for expr in exprs:
        result = prometheus.query(expr)
        if result.get("status") != "success":
            failures.append(f"{expr}: {result.get('error')}")
        elif not result["data"]["result"]:
            needs_power = any(name in expr for name in POWER_METRICS)
            if needs_power and not power_exported:
                continue  # absent by design here: no NVML, no RAPL, and the server says so
            failures.append(f"{expr}: no data")
    assert not failures, "\n".join(failures)


def test_rate_of_tokens_matches_what_the_client_counted(stack):
    _, prometheus, token_times, (load_started, load_ended) = stack
    at = load_ended
    result = prometheus.query(f"sum(rate(yayi_generation_tokens_total[{RATE_WINDOW_S}s]))", at=at)
    prometheus_rate = float(result["data"]["result"][0]["value"][1])
    client_rate = sum(1 for t in token_times if at - RATE_WINDOW_S < t <= at) / RATE_WINDOW_S
    assert load_ended - load_started > RATE_WINDOW_S
    assert prometheus_rate == pytest.approx(client_rate, rel=0.10), (prometheus_rate, client_rate)
