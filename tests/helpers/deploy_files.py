"""The deploy/ files the deployment tests of both tiers read, and the dashboard's queries."""

from __future__ import annotations

import json

from loadtest import ROOT

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "yayi-serve.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DOCKERFILES = {"cpu": DEPLOY / "docker" / "Dockerfile.cpu", "cuda": DEPLOY / "docker" / "Dockerfile.cuda"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    found = []
    for panel in dashboard()["panels"]:
        found.extend([panel, *panel.get("panels", [])])  # rows may nest panels
    return [p for p in found if p.get("type") != "row"]


def all_exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]
