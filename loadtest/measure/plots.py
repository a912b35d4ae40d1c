"""matplotlib the way every report draws: no display, one line per group."""

from __future__ import annotations

import math


def pyplot():
    """matplotlib.pyplot on the Agg backend: reports are written on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(
    ax,
    rows: list[dict],
    x: str,
    y: str,
    group: str | tuple[str, ...],
    *,
    logx=False,
    logy=False,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    marker: str = "o",
) -> None:
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
