"""What the figures were measured on: the one machine description every report carries.

yayi-compare's speed.md and each bench/ experiment page print it the same way, so two
reports can be told apart (or matched) by their machine line alone.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | None = None) -> dict:
    """The machine, and the library versions behind the figures.

    torch and transformers are named only if the caller has already imported them: a report
    must not pay for (or depend on) a library its figures never used.
    """
    import psutil

    info = {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
    }
    if device is not None:
        info["device"] = device
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if device and device.startswith("cuda") and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.device(device))
            info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        info["transformers"] = transformers.__version__
    return info


def describe(info: dict) -> str:
    """One line for a report page: ``cpu <name>, logical_cpus 2, ram_gib 7.8, ...``."""
    return ", ".join(f"{key} {value}" for key, value in info.items())
