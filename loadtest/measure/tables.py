"""The one markdown-table writer: yayi-compare's speed table, every bench/ experiment table and
the benchmarks' printed tables all go through ``markdown_table``, so a number reads the same
(same rounding, same alignment) wherever it is printed."""

from __future__ import annotations

import math


def format_cell(value) -> str:
    """Strings as they are (a caller that wants "n/a" or "12.5%" writes it); numbers to about
    three significant figures, since more would only show the noise of a shared machine."""
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
    """``columns`` picks and orders the keys (default: the first row's); ``headers`` renames them.
    Numeric columns are right-aligned."""
    if not columns:
        columns = list(rows[0]) if rows else []
    headers = headers or {}
    lines = [
        "| " + " | ".join(_escape(headers.get(c, c)) for c in columns) + " |",
        "| " + " | ".join("---:" if _numeric(rows, c) else "---" for c in columns) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_escape(format_cell(row.get(c))) for c in columns) + " |")
    return "\n".join(lines)


def _escape(cell: str) -> str:
    # A bare "|" in a cell (an error message, a failure note) would split it into two columns.
    return cell.replace("|", "\\|")


def _numeric(rows: list[dict], column: str) -> bool:
    values = [r.get(column) for r in rows if r.get(column) is not None]
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
