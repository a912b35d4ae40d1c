"""Where a report goes, and the folder writer every bench/ experiment uses.

One output-folder rule for every tool: ``reports/<name>-<UTC time>`` under the repository
(``--out`` moves it).  UTC, so a folder's name matches the ``date_utc`` of the machine it
describes and sorts the same on every machine.

A ``Report`` leaves ``<name>.md`` (the exact command first, then the machine, then each
table and plot), ``<table>.csv`` and ``<table>.json`` per table, ``<plot>.png`` per figure
and ``machine.json``.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

from loadtest import ROOT
from loadtest.measure.machine import describe, machine_info
from loadtest.measure.tables import markdown_table


def default_out(name: str) -> Path:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return ROOT / "reports" / f"{name}-{stamp}"


class Report:
    """Collects sections in order and writes them all at the end (and after each table, so a
    run stopped half-way still leaves what it had)."""

    def __init__(
        self, experiment: str, out: str | Path | None, module: str, argv: list[str] | None, device: str = "cpu"
    ) -> None:
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

    def table(
        self,
        stem: str,
        rows: list[dict],
        columns: list[str] | None = None,
        headers: dict | None = None,
        title: str = "",
        note: str = "",
    ) -> Path:
        self.tables[stem] = rows
        columns = columns or (list(rows[0]) if rows else [])
        with open(self.dir / f"{stem}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        (self.dir / f"{stem}.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
        parts = [
            f"## {title}" if title else "",
            note,
            markdown_table(rows, columns, headers),
            f"(`{stem}.csv`, `{stem}.json`)",
        ]
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
        head = [f"# {self.experiment}", "```\n" + self.command + "\n```", "Machine: " + describe(machine)]
        self.markdown_path.write_text("\n\n".join(head + self.sections) + "\n")
        return self.markdown_path
