"""The second clock: guidellm, an outside client, drives the same step against our HTTP front end and
against the peer, so a ratio does not rest on our own Locust users alone.

Why guidellm (0.8, its ``concurrent`` profile) and not AIPerf 0.13: both run offline against a
local OpenAI server, but AIPerf pins prometheus-client 0.23 (the server needs 0.26), psutil 7.0,
pandas, pillow and rich to exact minor versions and runs as several ZMQ service processes, more
than a 2-core machine spares beside the servers it measures; guidellm needs a handful of small
packages, runs from a local JSON file of prompts and a local tokenizer, and its ``concurrent``
profile is Locust's load: N streams, each sending its next request when the last one ends.

It lives in an environment of its own (``$VENV/guidellm``, made by ``python -m
loadtest.compare.second_clock install``, which ``make compare`` runs): guidellm 0.8 pins click 8.4, and the
dev extra's check-jsonschema needs click 8.5, so the two cannot be resolved into one environment.
That environment reads everything else (torch, transformers, datasets, httpx) from the project's
venv through a ``.pth`` file; the pin is pyproject.toml's ``second-clock`` extra. AIPerf, which
tests/integration/test_aiperf.py runs against the HTTP front end, is installed the same way into
``$VENV/aiperf`` (``install aiperf``), from the ``aiperf`` extra.

Each run sends the run's prompts in turn (a JSON file, enough rows never to run out), greedy, at
most ``max_new_tokens`` (``ignore_eos`` exactly when the Locust load asks for it), streaming
``/v1/completions``, for the step's duration; its figure is guidellm's own output tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

from loadtest import ROOT

# Rows per stream-second written to the prompts file: far more requests than any step can make.
ROWS_PER_STREAM_SECOND = 20
MIN_ROWS = 300


@dataclass(frozen=True)
class OwnEnvironment:
    """An outside client whose pins the project's venv cannot hold: ``$VENV/<name>``, from one pin in a
    pyproject.toml extra; ``name`` is the distribution, its console script and the folder."""

    name: str
    extra: str


GUIDELLM = OwnEnvironment("guidellm", "second-clock")
AIPERF = OwnEnvironment("aiperf", "aiperf")
CLIENTS = {client.name: client for client in (GUIDELLM, AIPERF)}


def pinned_spec(pyproject: Path = ROOT / "pyproject.toml", client: OwnEnvironment = GUIDELLM) -> str:
    """The client's one pin in its pyproject.toml extra (``guidellm==X.Y.Z``)."""
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    return next(spec for spec in extras[client.extra] if Requirement(spec).name == client.name)


def env_dir(venv: Path | None = None, client: OwnEnvironment = GUIDELLM) -> Path:
    return (Path(sys.prefix) if venv is None else venv) / client.name


def executable(venv: Path | None = None, client: OwnEnvironment = GUIDELLM) -> Path | None:
    """The client in its own environment, else on PATH, else None."""
    own = env_dir(venv, client) / "bin" / client.name
    if own.exists():
        return own
    import shutil

    found = shutil.which(client.name)
    return Path(found) if found else None


def installed_version(venv: Path | None = None, client: OwnEnvironment = GUIDELLM) -> str | None:
    site = _site_packages(env_dir(venv, client))
    found = sorted(site.glob(f"{client.name}-*.dist-info")) if site else []
    return found[0].name.removeprefix(f"{client.name}-").removesuffix(".dist-info") if found else None


def _site_packages(env: Path) -> Path | None:
    found = sorted(env.glob("lib/python*/site-packages"))
    return found[0] if found else None


def install(venv: Path | None = None, client: OwnEnvironment = GUIDELLM) -> Path:
    """Make ``$VENV/<client>`` with the pinned client, reading the project venv's packages through a
    ``.pth`` file; nothing is done when a version the pin allows is already there."""
    spec = pinned_spec(client=client)
    env = env_dir(venv, client)
    script = env / "bin" / client.name
    version = installed_version(venv, client)
    if version is not None and Requirement(spec).specifier.contains(version) and script.exists():
        return script
    if not (env / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    site = _site_packages(env)
    assert site is not None, f"{env}: no site-packages after python -m venv"
    # Last on its path: the client's own pins (guidellm's click 8.4, AIPerf's prometheus-client 0.23)
    # come first, the rest from the project's venv.
    (site / "zz-project-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-warn-conflicts"]
    subprocess.run([*pip, spec], check=True)
    return script


@dataclass(frozen=True)
class ClockLoad:
    """One step as the second clock runs it: the same concurrency, length and prompts as Locust's."""

    users: int
    duration_s: float
    max_new_tokens: int
    ignore_eos: bool
    prompts: tuple[str, ...]
    chat_template: bool = False
    temperature: float = 0.0


def data_rows(load: ClockLoad) -> list[dict]:
    """The prompts in turn, enough of them that the step ends on its clock, not for want of data; a
    row with ``output_tokens_count`` makes guidellm send ``max_tokens`` with ``ignore_eos``."""
    count = max(MIN_ROWS, math.ceil(load.users * load.duration_s * ROWS_PER_STREAM_SECOND))
    rows: list[dict] = [{"prompt": load.prompts[i % len(load.prompts)]} for i in range(count)]
    if load.ignore_eos:
        for row in rows:
            row["output_tokens_count"] = load.max_new_tokens
    return rows


def command(
    guidellm: Path, url: str, served_model: str, tokenizer: str, load: ClockLoad, data: Path, out_json: Path
) -> list[str]:
    backend: dict[str, object] = {
        "kind": "openai_http",
        "target": url,
        "model": served_model,
        "request_format": "/v1/chat/completions" if load.chat_template else "/v1/completions",
        "extras": {"body": {"temperature": load.temperature}},
    }
    if not load.ignore_eos:
        backend["max_tokens"] = load.max_new_tokens
    return [
        str(guidellm),
        "run",
        "--backend",
        json.dumps(backend),
        "--profile",
        f"kind=concurrent,streams={load.users}",
        "--constraint",
        f"kind=max_duration,seconds={load.duration_s:g}",
        "--data",
        f"kind=json_file,path={data}",
        "--tokenizer",
        f"kind=huggingface_auto,model={tokenizer}",
        "--output",
        f"kind=json,path={out_json}",
        "--disable-console",
    ]


def run(url: str, served_model: str, tokenizer: str, load: ClockLoad, prefix: Path, guidellm: Path) -> dict:
    """One step: guidellm's JSON at ``PREFIX_guidellm.json``, its log beside; returns its summary."""
    data = Path(f"{prefix}_guidellm_prompts.json")
    rows = data_rows(load)
    data.write_text(json.dumps(rows))
    out_json = Path(f"{prefix}_guidellm.json")
    argv = command(guidellm, url, served_model, tokenizer, load, data, out_json)
    log_path = Path(f"{prefix}_guidellm.log")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        returncode = _run_watched(argv, log, env, prefix.parent, load.duration_s + HANG_GRACE_S)
        if returncode is None:
            print(f"  guidellm hung before finishing ({log_path.name}): killed, run once more", file=sys.stderr)
            returncode = _run_watched(argv, log, env, prefix.parent, load.duration_s + HANG_GRACE_S)
    if returncode != 0 or not out_json.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        said = "hung twice" if returncode is None else f"exited {returncode}"
        raise RuntimeError(f"guidellm {said}:\n{tail}")
    summary = read_summary(out_json)
    summary["data_ran_out"] = summary["requests_total"] >= len(rows)
    return summary


# guidellm 0.8 can deadlock at a step's start: its main process forks a torch DataLoader worker while
# its own threads run, and its spawned workers then wait for a start that never comes (seen here once
# in a loaded test run: four processes idle for minutes after "started").  A run still going this
# long past its duration is killed with every process it made and run once more, from scratch.
HANG_GRACE_S = 90


def _run_watched(argv: list[str], log, env: dict[str, str], cwd: Path, timeout: float) -> int | None:
    """The exit status, or None when it had to be killed (its whole session: the workers too)."""
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.write(f"\n[killed after {timeout:.0f} s without a result]\n")
        log.flush()
        return None


def read_summary(path: Path) -> dict:
    """The figures of guidellm's JSON the report uses: output tokens/s as guidellm prints it (its
    "Server Throughput" mean, all requests), request counts, TTFT and ITL medians."""
    benchmark = json.loads(Path(path).read_text())["benchmarks"][0]
    metrics = benchmark["metrics"]
    totals = metrics["request_totals"]

    def successful_median(name: str) -> float | None:
        stats = (metrics.get(name) or {}).get("successful") or {}
        return stats.get("median") if stats.get("count") else None

    return {
        "speed_tokens_per_s": metrics["output_tokens_per_second"]["total"]["mean"],
        "output_tokens": metrics["output_token_count"]["total"]["total_sum"],
        "requests_ok": totals["successful"],
        "requests_failed": totals["errored"],
        "requests_cut": totals["incomplete"],
        "requests_total": totals["total"],
        "ttft_p50_ms": successful_median("time_to_first_token_ms"),
        "itl_p50_ms": successful_median("inter_token_latency_ms"),
        "duration_s": benchmark["duration"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.compare.second_clock", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("action", choices=["install", "where"], help="install: make $VENV/CLIENT; where: print it")
    parser.add_argument("client", nargs="?", choices=sorted(CLIENTS), default=GUIDELLM.name, help="default: guidellm")
    args = parser.parse_args(argv)
    client = CLIENTS[args.client]
    if args.action == "install":
        print(install(client=client))
        return 0
    found = executable(client=client)
    print(found or f"{client.name} is not installed: python -m loadtest.compare.second_clock install {client.name}")
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
