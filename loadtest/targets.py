"""The servers the comparison driver measures, each behind the same small interface.

A target starts, warms up, is watched while the load runs (device memory, utilisation,
power, energy and the server's own token count) and stops.  ``YayiTarget`` is our server
with one engine, loaded through one front end (``api``: gRPC, or the OpenAI-compatible HTTP
one), and reads its /metrics; ``OpenAIServerTarget`` is vLLM's own OpenAI-compatible server,
whose process tree is read the way our CPU probe reads ours.  Every target says which
locustfile drives it and with which extra options, and ``openai_url`` is where an OpenAI
client (vLLM's benchmark client) reaches it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from loadtest import scrape
from loadtest.server_process import ROOT, ServerProcess
from server.device_sampler import CpuProbe


@dataclass
class Reading:
    """Device figures over one stretch of time (idle, or one load step)."""

    memory_peak_bytes: float | None = None
    utilization_mean: float | None = None
    power_mean_w: float | None = None
    energy_j: float | None = None
    server_tokens: float | None = None
    device: str = "cpu"


class YayiTarget:
    locustfile = ROOT / "loadtest" / "speed.py"

    def __init__(
        self,
        engine: str,
        model: str,
        server_args: list[str],
        queue: int,
        sample_period: float,
        api: str = "grpc",
        shares_with: YayiTarget | None = None,
    ) -> None:
        """``shares_with``: the target just before this one, of the same engine through the other front
        end; its server is handed over rather than stopped and started again, so both front ends are
        measured on one process, back to back (and a vllm start, minutes on a CPU, is paid once)."""
        # Rows of the HTTP front end are labelled apart, so one report holds both front ends.
        self.label = engine if api == "grpc" else f"{engine}-http"
        self.engine, self.model, self.api = engine, model, api
        sharing = shares_with is not None or api == "http"
        self.server_args = server_args + (["--http-port", "0"] if sharing else [])
        self.queue = queue
        self.sample_period = sample_period
        self.server: ServerProcess | None = None
        self.info: dict = {}
        self.shares_with = shares_with
        self.hands_over = False  # set on the target whose server the next one takes
        if shares_with is not None:
            shares_with.hands_over = True
            shares_with.server_args = self.server_args

    @property
    def host(self) -> str:
        return self.server.http_url if self.api == "http" else self.server.address

    @property
    def openai_url(self) -> str:
        return self.server.http_url

    def locust_args(self) -> list[str]:
        return ["--api", "http", "--served-model", self.model] if self.api == "http" else []

    def start(self, timeout: float) -> dict:
        handed = self.shares_with.server if self.shares_with is not None else None
        if handed is not None and handed.process.poll() is None:
            self.server, self.info = handed, self.shares_with.info
            return self.info
        self.server = ServerProcess(
            "--engine",
            self.engine,
            "--model",
            self.model,
            "--max-queue",
            str(self.queue),
            "--device-sample-period",
            str(self.sample_period),
            *self.server_args,
            ready_timeout=timeout,
        ).wait_ready(timeout)
        from server.wire import pb

        info = self.server.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
        self.info = {
            "engine": info.engine,
            "dtype": info.dtype,
            "device": info.device,
            "attention": info.attention,
            "use_cache": info.use_cache,
            "model_path": info.model_path,
        }
        return self.info

    def warm_up(self) -> None:
        for _ in self.server.stream("Warm up.", max_new_tokens=8, ignore_eos=True, timeout=300):
            pass

    def metrics_text(self) -> str:
        return scrape.fetch(scrape.metrics_url(self.server.metrics_port))

    def watch(self, raw_prefix: Path) -> MetricsWatch:
        return MetricsWatch(self, raw_prefix)

    def stop(self) -> None:
        if self.server is not None and not self.hands_over:
            self.server.stop()

    def startup_output(self) -> str:
        return "\n".join(self.server.lines[-20:]) if self.server else ""


class MetricsWatch:
    """Gauges sampled through the run; counters read once before and once after it."""

    GAUGES = ("yayi_device_memory_used_bytes", "yayi_device_utilization_ratio", "yayi_device_power_watts")

    def __init__(self, target: YayiTarget, raw_prefix: Path) -> None:
        self.target, self.raw_prefix = target, raw_prefix
        self.reading = Reading(device=target.info.get("device", "cpu"))

    def __enter__(self) -> MetricsWatch:
        body = self.target.metrics_text()
        Path(f"{self.raw_prefix}_metrics_before.txt").write_text(body)
        self.before = scrape.parse(body)
        # Scraping no faster than the server samples its device: more often would only repeat values.
        self.sampler = scrape.GaugeSampler(
            scrape.metrics_url(self.target.server.metrics_port), self.GAUGES, period=max(0.5, self.target.sample_period)
        )
        self.sampler.__enter__()
        return self

    def __exit__(self, *_) -> None:
        self.sampler.__exit__()
        body = self.target.metrics_text()
        Path(f"{self.raw_prefix}_metrics_after.txt").write_text(body)
        after = scrape.parse(body)
        self.reading.memory_peak_bytes = self.sampler.max("yayi_device_memory_used_bytes")
        self.reading.utilization_mean = self.sampler.mean("yayi_device_utilization_ratio")
        self.reading.power_mean_w = self.sampler.mean("yayi_device_power_watts")
        self.reading.energy_j = _delta(self.before, after, "yayi_energy_joules_total")
        self.reading.server_tokens = _delta(self.before, after, "yayi_generation_tokens_total")


def _delta(before: scrape.Samples, after: scrape.Samples, name: str) -> float | None:
    start, end = scrape.total(before, name), scrape.total(after, name)
    # A labelled counter appears at its first increment: absent before means zero then.
    return None if end is None else end - (start or 0.0)


class OpenAIServerTarget:
    """vLLM's own server (``python -m vllm.entrypoints.openai.api_server``), for the baseline rows."""

    locustfile = ROOT / "loadtest" / "openai_speed.py"
    label = "vllm-openai"

    def __init__(
        self,
        model_path: str,
        served_name: str,
        dtype: str,
        kv_cache_gb: float,
        max_model_len: int,
        extra_args: list[str],
        log_path: Path,
        sample_period: float,
    ) -> None:
        self.model_path, self.served_name = model_path, served_name
        self.dtype, self.kv_cache_gb, self.max_model_len = dtype, kv_cache_gb, max_model_len
        self.extra_args, self.log_path, self.sample_period = extra_args, log_path, sample_period
        self.process: subprocess.Popen | None = None
        self.port = _free_port()
        self.info: dict = {}

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    openai_url = host

    def locust_args(self) -> list[str]:
        return ["--served-model", self.served_name]

    def start(self, timeout: float) -> dict:
        command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_path,
            "--served-model-name",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--seed",
            "0",
            *self.extra_args,
        ]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": f"{self.kv_cache_gb:g}"}
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM's server exited ({self.process.returncode}):\n{self.startup_output()}")
            try:
                with urllib.request.urlopen(f"{self.host}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
        else:
            raise TimeoutError(f"vLLM's server not healthy after {timeout:.0f} s:\n{self.startup_output()}")
        self.info = {
            "engine": "vllm (OpenAI server)",
            "dtype": self.dtype,
            "device": "cpu",
            "attention": "vLLM's own",
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
        urllib.request.urlopen(request, timeout=300).read()

    def metrics_text(self) -> str:
        return scrape.fetch(f"{self.host}/metrics")

    def watch(self, raw_prefix: Path) -> ProcessWatch:
        return ProcessWatch(self, raw_prefix)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self._log.close()

    def startup_output(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""


class ProcessWatch:
    """The server's process tree read by our own CPU probe, so its memory and CPU share mean
    what ours mean; its token count from vLLM's own counter."""

    TOKENS = "vllm:generation_tokens_total"

    def __init__(self, target: OpenAIServerTarget, raw_prefix: Path) -> None:
        self.target, self.raw_prefix = target, raw_prefix
        self.reading = Reading(device="cpu")
        self._stop = threading.Event()

    def __enter__(self) -> ProcessWatch:
        body = self.target.metrics_text()
        Path(f"{self.raw_prefix}_metrics_before.txt").write_text(body)
        self.before = scrape.parse(body)
        self.probe = CpuProbe(pid=self.target.process.pid)
        self.memory: list[float] = []
        self.shares: list[float] = []
        self.powers: list[float] = []
        self.energy: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.target.sample_period):
            reading = self.probe.read()
            self.memory.append(reading.memory_used_bytes)
            self.shares.append(reading.utilization_ratio)
            if reading.power_watts is not None:
                self.powers.append(reading.power_watts)
                self.energy = (self.energy or 0.0) + reading.energy_joules

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
        body = self.target.metrics_text()
        Path(f"{self.raw_prefix}_metrics_after.txt").write_text(body)
        self.reading.memory_peak_bytes = max(self.memory) if self.memory else None
        self.reading.utilization_mean = sum(self.shares) / len(self.shares) if self.shares else None
        self.reading.power_mean_w = sum(self.powers) / len(self.powers) if self.powers else None
        self.reading.energy_j = self.energy
        self.reading.server_tokens = _delta(self.before, scrape.parse(body), self.TOKENS)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
