"""Reads the device's memory, utilisation and power in a background thread.

On CUDA the figures come from NVML (the whole GPU, as nvidia-smi shows it), with
torch's own allocator statistics beside them.  On a CPU they come from psutil for the
server process and its children (vLLM runs its engine in child processes) and from
Linux RAPL for package power, where the powercap files are readable.  A figure that
cannot be read is left out, and the reason is logged once at start-up: an absent series
tells an operator "unknown", a zero would lie.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import time
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceReading:
    device: str
    memory_used_bytes: float | None = None
    utilization_ratio: float | None = None
    power_watts: float | None = None
    energy_joules: float | None = None  # since the previous reading
    torch_allocated_bytes: float | None = None
    torch_peak_allocated_bytes: float | None = None


class CpuProbe:
    def __init__(self, pid: int | None = None) -> None:
        self.label = "cpu"
        # Another pid lets the comparison driver watch a server that is not ours (vLLM's own).
        self._process = psutil.Process(pid or os.getpid())
        self._cpu_count = psutil.cpu_count() or 1
        self._cpu_times: dict[int, float] = {}
        self._last_time = time.monotonic()
        self._rapl = RaplReader()
        self._last_read = time.monotonic()
        self._sample_cpu_share()  # the first share is measured from here

    def describe_missing(self) -> list[str]:
        return [] if self._rapl.available else [f"power and energy: {self._rapl.why_unavailable}"]

    def read(self) -> DeviceReading:
        processes = self._processes()
        rss = 0
        for process in processes:
            try:
                rss += process.memory_info().rss
            except psutil.Error:
                continue
        now = time.monotonic()
        energy = self._rapl.joules_since_last()
        power = energy / max(1e-6, now - self._last_read) if energy is not None else None
        self._last_read = now
        return DeviceReading(
            device=self.label,
            memory_used_bytes=float(rss),
            utilization_ratio=self._sample_cpu_share(),
            power_watts=power,
            energy_joules=energy,
        )

    def _processes(self) -> list[psutil.Process]:
        try:
            return [self._process, *self._process.children(recursive=True)]
        except psutil.Error:
            return [self._process]

    def _sample_cpu_share(self) -> float:
        now = time.monotonic()
        busy = 0.0
        seen: dict[int, float] = {}
        for process in self._processes():
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total = times.user + times.system
            seen[process.pid] = total
            # A process first seen now (a new child) counts from now on, not its whole past.
            busy += total - self._cpu_times.get(process.pid, total)
        elapsed = max(1e-6, now - self._last_time)
        self._cpu_times, self._last_time = seen, now
        return min(1.0, max(0.0, busy / (elapsed * self._cpu_count)))


class RaplReader:
    """Package energy from /sys/class/powercap, summed over CPU packages, wrap-around handled."""

    def __init__(self, root: str = "/sys/class/powercap") -> None:
        self._domains: list[tuple[str, int]] = []
        self._last: dict[str, int] = {}
        self.why_unavailable = ""
        for folder in sorted(glob.glob(f"{root}/intel-rapl:*")):
            try:
                with open(f"{folder}/name") as name_file:
                    if not name_file.read().startswith("package"):
                        continue
                with open(f"{folder}/max_energy_range_uj") as range_file:
                    wrap = int(range_file.read())
                self._last[folder] = self._read_uj(folder)
                self._domains.append((folder, wrap))
            except (OSError, ValueError) as exc:
                self.why_unavailable = f"RAPL at {folder} is not readable ({getattr(exc, 'strerror', None) or exc})"
        if not self._domains and not self.why_unavailable:
            self.why_unavailable = f"no RAPL package domain under {root} (virtual machine or non-Intel/AMD CPU)"

    @property
    def available(self) -> bool:
        return bool(self._domains)

    def joules_since_last(self) -> float | None:
        if not self._domains:
            return None
        total_uj = 0
        for folder, wrap in self._domains:
            now = self._read_uj(folder)
            delta = now - self._last[folder]
            total_uj += delta if delta >= 0 else delta + wrap
            self._last[folder] = now
        return total_uj / 1e6

    @staticmethod
    def _read_uj(folder: str) -> int:
        with open(f"{folder}/energy_uj") as energy_file:
            return int(energy_file.read())


class NvmlProbe:
    def __init__(self, index: int) -> None:
        import pynvml  # from nvidia-ml-py

        self._nvml = pynvml
        pynvml.nvmlInit()
        self.label = f"cuda:{index}"
        self._index = index
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._missing: list[str] = []
        self._energy_mj = self._try("total energy", pynvml.nvmlDeviceGetTotalEnergyConsumption)
        self._power_ok = self._try("power", pynvml.nvmlDeviceGetPowerUsage) is not None

    def _try(self, what: str, read):
        try:
            return read(self._handle)
        except self._nvml.NVMLError as exc:
            self._missing.append(f"{what}: NVML says {exc}")
            return None

    def describe_missing(self) -> list[str]:
        return list(self._missing)

    def read(self) -> DeviceReading:
        nvml = self._nvml
        memory = nvml.nvmlDeviceGetMemoryInfo(self._handle).used
        utilization = nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100.0
        power = nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0 if self._power_ok else None
        energy = None
        if self._energy_mj is not None:
            now_mj = nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            energy, self._energy_mj = (now_mj - self._energy_mj) / 1000.0, now_mj
        allocated = peak = None
        import torch

        if torch.cuda.is_initialized():
            allocated = float(torch.cuda.memory_allocated(self._index))
            peak = float(torch.cuda.max_memory_allocated(self._index))
        return DeviceReading(
            device=self.label,
            memory_used_bytes=float(memory),
            utilization_ratio=utilization,
            power_watts=power,
            energy_joules=energy,
            torch_allocated_bytes=allocated,
            torch_peak_allocated_bytes=peak,
        )


def make_probe(device: str):
    """The probe for the device an engine reports ("cpu", "cuda", "cuda:1")."""
    if not device.startswith("cuda"):
        return CpuProbe()
    index = int(device.split(":")[1]) if ":" in device else 0
    try:
        return NvmlProbe(index)
    except Exception as exc:  # no nvidia-ml-py, no driver: say so, and fall back to the host's figures
        log.warning("GPU metrics unavailable (%s): install nvidia-ml-py; exporting host CPU figures instead", exc)
        return CpuProbe()


class DeviceSampler:
    def __init__(self, probe, on_reading, period_s: float = 1.0) -> None:
        self._probe = probe
        self._on_reading = on_reading
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="device-sampler", daemon=True)

    def start(self) -> None:
        for reason in self._probe.describe_missing():
            log.warning("device metrics: not exported on %s: %s", self._probe.label, reason)
        self._sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self._period_s + 1)

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            self._sample()

    def _sample(self) -> None:
        try:
            self._on_reading(self._probe.read())
        except Exception:
            log.exception("device sample failed; keeping the previous figures")
