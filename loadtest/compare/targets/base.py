"""What every target shares: the settings they are set up from, the interface the drivers call,
the reading of one stretch of a run, and an outside OpenAI-compatible server's process life.

A target starts, warms up, is watched while the load runs (device memory, utilisation, power,
energy and the server's own token count) and stops.  Every target says which locustfile drives
it and with which extra options, and ``openai_url`` is where an OpenAI client (vLLM's benchmark
client) reaches it: the ``Target`` protocol.  They are set up from one ``TargetConfig``, never
from a driver's command line.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from loadtest.launch.server_process import ROOT
from loadtest.measure import scrape
from server.device_sampler import CpuProbe


@dataclass(frozen=True)
class TargetConfig:
    """What the targets are set up from: the model, and the settings the peers must share with ours."""

    model: str
    model_path: str
    dtype: str  # the hf engines' and transformers serve's
    vllm_dtype: str  # our vllm engine's and vLLM's own server's
    kv_cache_gb: float
    max_model_len: int | None  # None: the model's own, at most the fallback both vLLM servers use
    sample_period: float
    baseline_args: tuple[str, ...] = ()  # extra arguments for vLLM's own server
    transformers_serve_args: tuple[str, ...] = ()  # for the one with hf-cb's cache
    transformers_serve_defaults_args: tuple[str, ...] = ()  # for the one left to its own defaults
    server_args: tuple[str, ...] = ()  # every engine's extra yayi-serve flags: llama-server reads llama-cpp's here
    llama_server_args: tuple[str, ...] = ()  # extra arguments for llama.cpp's own server


class Target(Protocol):
    """What the comparison driver asks of every server it measures."""

    label: str
    locustfile: Path

    @property
    def host(self) -> str: ...

    @property
    def openai_url(self) -> str: ...

    def locust_args(self) -> list[str]: ...

    def start(self, timeout: float) -> dict: ...

    def warm_up(self) -> None: ...

    def metrics_text(self) -> str: ...

    def watch(self, raw_prefix: Path) -> Watch: ...

    def stop(self) -> None: ...

    def startup_output(self) -> str: ...


@dataclass
class Reading:
    """Device figures over one stretch of time (idle, or one load step)."""

    memory_peak_bytes: float | None = None
    utilization_mean: float | None = None
    power_mean_w: float | None = None
    energy_j: float | None = None
    server_tokens: float | None = None
    device: str = "cpu"


class Watch:
    """One stretch of a run: the target's counters read before and after, its gauges sampled between.

    The before/after reading and the raw files are here, once; each kind of target says how its
    device is sampled (``_start``, ``_stop``) and what the reading is (``_fill``).
    """

    def __init__(self, target, raw_prefix: Path, device: str) -> None:
        self.target, self.raw_prefix = target, raw_prefix
        self.reading = Reading(device=device)

    def __enter__(self):
        self.before = scrape.parse(self._keep("before"))
        self._start()
        return self

    def __exit__(self, *_) -> None:
        self._stop()
        self._fill(scrape.parse(self._keep("after")))

    def _keep(self, when: str) -> str:
        body = self.target.metrics_text()
        if body:
            Path(f"{self.raw_prefix}_metrics_{when}.txt").write_text(body)
        return body

    def _start(self) -> None: ...

    def _stop(self) -> None: ...

    def _fill(self, after: scrape.Samples) -> None: ...


def counter_delta(before: scrape.Samples, after: scrape.Samples, name: str) -> float | None:
    start, end = scrape.total(before, name), scrape.total(after, name)
    # A labelled counter appears at its first increment: absent before means zero then.
    return None if end is None else end - (start or 0.0)


class OutsideServerTarget:
    """An outside OpenAI-compatible server for the baseline rows: started on a free port as its own
    process group (so its children go with it), watched by our CPU probe, loaded through streaming
    ``/v1/completions``.  A subclass says how to start it and what it counts."""

    locustfile = ROOT / "loadtest" / "speed.py"
    label = ""
    name = ""  # how the log's Engine column names it
    attention = ""
    tokens_counter: str | None = None  # its own Prometheus counter of generated tokens, if it has one

    def __init__(self, model_path: str, served_name: str, dtype: str, log_path: Path, sample_period: float) -> None:
        self.model_path, self.served_name, self.dtype = model_path, served_name, dtype
        self.log_path, self.sample_period = log_path, sample_period
        self.process: subprocess.Popen | None = None
        self.port = free_port()
        self.info: dict = {}

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        return self.host

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    fresh_connection = False  # llama-server closes a streamed connection after answering

    def locust_args(self) -> list[str]:
        args = ["--api", "http", "--served-model", self.served_name]
        return [*args, "--fresh-connection", "true"] if self.fresh_connection else args

    def start(self, timeout: float) -> dict:
        command = self.command()
        self._log = open(self.log_path, "w")
        # The exact command first, so the raw folder says how the peer was run.
        self._log.write(f"$ {shlex.join(command)}\n")
        self._log.flush()
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env(),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} exited ({self.process.returncode}):\n{self.startup_output()}")
            try:
                with urllib.request.urlopen(f"{self.host}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
        else:
            raise TimeoutError(f"{self.label} not healthy after {timeout:.0f} s:\n{self.startup_output()}")
        self.info = {
            "engine": self.name,
            "dtype": self.dtype,
            "device": "cpu",
            "attention": self.attention,
            "use_cache": True,
            "model_path": self.model_path,
        }
        return self.info

    def warm_up(self) -> None:
        import json

        body = json.dumps({"model": self.served_name, "prompt": "Warm up.", "max_tokens": 8}).encode()
        request = urllib.request.Request(
            f"{self.host}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            urllib.request.urlopen(request, timeout=300).read()
        except urllib.error.HTTPError as error:
            # Its own words (transformers serve says why its worker died), not just the status line.
            detail = error.read().decode(errors="replace")[:500]
            raise RuntimeError(f"{self.label} refused its warm-up: {error.code} {detail}") from None

    def metrics_text(self) -> str:
        return scrape.fetch(f"{self.host}/metrics") if self.tokens_counter else ""

    def settle(self) -> None:
        """Called when a step's load has ended, before its counters are read: by default nothing."""

    def watch(self, raw_prefix: Path) -> ProcessWatch:
        return ProcessWatch(self, raw_prefix)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process is not None:
            self._log.close()

    def startup_output(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""


class ProcessWatch(Watch):
    """The server's process tree read by our own CPU probe, so its memory and CPU share mean
    what ours mean; its token count from its own counter, where it has one."""

    def __init__(self, target: OutsideServerTarget, raw_prefix: Path) -> None:
        super().__init__(target, raw_prefix, "cpu")

    def _start(self) -> None:
        self.probe = CpuProbe(pid=self.target.process.pid)
        self.memory: list[float] = []
        self.shares: list[float] = []
        self.powers: list[float] = []
        self.energy: float | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self.target.sample_period):
            reading = self.probe.read()
            self.memory.append(reading.memory_used_bytes)
            self.shares.append(reading.utilization_ratio)
            if reading.power_watts is not None:
                self.powers.append(reading.power_watts)
                self.energy = (self.energy or 0.0) + reading.energy_joules

    def _stop(self) -> None:
        self._done.set()
        self._thread.join()
        self.target.settle()

    def _fill(self, after: scrape.Samples) -> None:
        self.reading.memory_peak_bytes = max(self.memory) if self.memory else None
        self.reading.utilization_mean = sum(self.shares) / len(self.shares) if self.shares else None
        self.reading.power_mean_w = sum(self.powers) / len(self.powers) if self.powers else None
        self.reading.energy_j = self.energy
        if self.target.tokens_counter:
            self.reading.server_tokens = counter_delta(self.before, after, self.target.tokens_counter)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
