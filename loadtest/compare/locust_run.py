"""One headless Locust run as a subprocess: the driver's unit of load."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from loadtest.measure.token_stats import read_summary_csv


@dataclass(frozen=True)
class LoadSpec:
    users: int
    duration_s: float
    max_new_tokens: int = 128
    ignore_eos: bool = True
    temperature: float = 0.0
    chat_template: bool = False
    prompts_file: str = ""
    stop_timeout_s: float = 0.0
    processes: int = 1


def locust_command(locustfile: Path, host: str, load: LoadSpec, csv_prefix: Path, extra: list[str] = ()) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(locustfile),
        "--host",
        host,
        "--headless",
        "-u",
        str(load.users),
        "-r",
        str(load.users),
        "-t",
        f"{load.duration_s:g}s",
        "--stop-timeout",
        f"{load.stop_timeout_s:g}",
        "--csv",
        str(csv_prefix),
        "--only-summary",
        "--max-new-tokens",
        str(load.max_new_tokens),
        "--ignore-eos",
        str(load.ignore_eos).lower(),
        "--temperature",
        f"{load.temperature:g}",
        "--chat-template",
        str(load.chat_template).lower(),
        *(["--prompts-file", load.prompts_file] if load.prompts_file else []),
        *(["--processes", str(load.processes)] if load.processes > 1 else []),
        *extra,
    ]
    return command


def run_locust(locustfile: Path, host: str, load: LoadSpec, csv_prefix: Path, extra: list[str] = ()) -> dict:
    """The run's serving summary (loadtest.measure.token_stats columns); raises with Locust's output on failure."""
    command = locust_command(locustfile, host, load, csv_prefix, extra)
    log_path = Path(f"{csv_prefix}_locust.log")
    with open(log_path, "w") as log:
        completed = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, timeout=load.duration_s + load.stop_timeout_s + 180
        )
    summary_path = Path(f"{csv_prefix}_tokens.csv")
    # Locust exits 1 when any request failed; that is a result to report, not a crash.
    if completed.returncode not in (0, 1) or not summary_path.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"locust exited {completed.returncode}:\n{tail}")
    return read_summary_csv(summary_path)
