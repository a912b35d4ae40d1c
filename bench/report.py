"""One report folder per experiment run: a markdown page, CSV + JSON tables, PNG plots, the machine.

Every experiment under ``bench/`` writes through this, so each run leaves the same things
behind: ``<experiment>.md`` (the exact command first, then the machine, then each table
and plot), ``<table>.csv`` and ``<table>.json`` per table, and ``<plot>.png`` per figure.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import platform
import shlex
import sys
from pathlib import Path


def default_out(experiment: str) -> Path:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("reports") / f"{experiment}-{stamp}"


def machine_info(device: str = "cpu") -> dict:
    """What the figures were measured on; torch is imported only if the caller already has."""
    import psutil

    from .roofline import cpu_name

    info = {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "device": device,
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if device.startswith("cuda") and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.device(device))
            info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    transformers = sys.modules.get("transformers")
    if transformers is not None:
        info["transformers"] = transformers.__version__
    return info


def format_cell(value) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf"
        magnitude = abs(value)
        if magnitude == 0:
            return "0"
        if magnitude >= 1000:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 0.01:
            return f"{value:.3g}"
        return f"{value:.2e}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str] | None = None, headers: dict | None = None) -> str:
    if not columns:
        columns = list(rows[0]) if rows else []
    headers = headers or {}
    lines = ["| " + " | ".join(headers.get(c, c) for c in columns) + " |",
             "| " + " | ".join("---:" if _numeric(rows, c) else "---" for c in columns) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _numeric(rows: list[dict], column: str) -> bool:
    values = [r.get(column) for r in rows if r.get(column) is not None]
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


class Report:
    """Collects sections in order and writes them all at the end (and after each table, so a
    run stopped half-way still leaves what it had)."""

    def __init__(self, experiment: str, out: str | Path | None, module: str, argv: list[str] | None,
                 device: str = "cpu") -> None:
        self.experiment = experiment
        self.dir = Path(out) if out else default_out(experiment)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.command = shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])
        self.device = device
        self.sections: list[str] = []
        self.tables: dict[str, list[dict]] = {}

    @property
    def markdown_path(self) -> Path:
        return self.dir / f"{self.experiment}.md"

    def text(self, markdown: str) -> None:
        self.sections.append(markdown.strip())
        self.write()

    def table(self, stem: str, rows: list[dict], columns: list[str] | None = None, headers: dict | None = None,
              title: str = "", note: str = "") -> Path:
        self.tables[stem] = rows
        columns = columns or (list(rows[0]) if rows else [])
        with open(self.dir / f"{stem}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        (self.dir / f"{stem}.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
        parts = [f"## {title}" if title else "", note, markdown_table(rows, columns, headers),
                 f"(`{stem}.csv`, `{stem}.json`)"]
        self.sections.append("\n\n".join(p for p in parts if p))
        self.write()
        return self.dir / f"{stem}.csv"

    def figure(self, stem: str, fig, caption: str = "") -> Path:
        path = self.dir / f"{stem}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        self.sections.append(f"![{caption or stem}]({stem}.png)" + (f"\n\n{caption}" if caption else ""))
        self.write()
        return path

    def write(self) -> Path:
        machine = machine_info(self.device)
        (self.dir / "machine.json").write_text(json.dumps(machine, indent=1) + "\n")
        head = [f"# {self.experiment}", "```\n" + self.command + "\n```",
                "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items())]
        self.markdown_path.write_text("\n\n".join(head + self.sections) + "\n")
        return self.markdown_path


def pyplot():
    """matplotlib without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(ax, rows: list[dict], x: str, y: str, group: str | tuple[str, ...], *, logx=False, logy=False,
              xlabel: str = "", ylabel: str = "", title: str = "", marker: str = "o") -> None:
    """One line per distinct value of ``group`` (a key or a tuple of keys), skipping missing points."""
    keys = (group,) if isinstance(group, str) else group
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        value = row.get(y)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            continue
        label = " ".join(str(row[k]) for k in keys)
        series.setdefault(label, []).append((row[x], value))
    for label, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize="small")
