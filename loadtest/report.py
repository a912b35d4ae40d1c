"""The comparison report: the inference log's table (docs/design.md) as speed.md, speed.csv, speed.json, plots.

The log's columns come first and keep their names.  On a CPU the "GPU" columns say what they
hold ("CPU 48%", "n/a (no RAPL)"): a blank or a made-up number would be read as a GPU figure.
The cells are written here; the table itself by loadtest/tables.py, as every other report's.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from loadtest.plots import pyplot
from loadtest.tables import markdown_table
from loadtest.token_stats import LATENCY_FIELDS

LOG_COLUMNS = ["Model", "Engine", "Speed (tokens/s)", "Mem (MB)", "GPU-UTL (%)", "use_cache", "Pwr_usg (W)", "Notes"]
EXTRA_COLUMNS = [
    "Users",
    "Req/s",
    "TTFT p50 (ms)",
    "TTFT p95 (ms)",
    "ITL p50 (ms)",
    "E2E p95 (ms)",
    "Errors",
    "J/token",
    "% of bound",
]

# Every field a row carries, in the order speed.csv writes them.
CSV_FIELDS = [
    "model",
    "engine",
    "users",
    "speed_tokens_per_s",
    "mem_mb",
    "util_pct",
    "util_source",
    "use_cache",
    "power_w",
    "power_source",
    "notes",
    "requests_per_s",
    *LATENCY_FIELDS,
    "per_user_tokens_per_s",
    "errors",
    "failures_by_status",
    "requests_ok",
    "requests_cut",
    "client_tokens",
    "server_tokens",
    "energy_j",
    "j_per_token",
    "bound_tokens_per_s",
    "pct_of_bound",
    "dtype",
    "device",
    "attention",
    "duration_s",
    "raw",
]


def _number(value, digits: int = 1) -> str:
    if value is None or value == "" or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _util_cell(row: dict) -> str:
    if row.get("util_pct") is None:
        return "n/a"
    return f"{row['util_pct']:.0f}" if row.get("util_source") == "GPU" else f"CPU {row['util_pct']:.0f}%"


def _power_cell(row: dict) -> str:
    if row.get("power_w") is None:
        return f"n/a ({row['power_source']})" if row.get("power_source") else "n/a"
    return (
        f"{row['power_w']:.1f}" if row.get("power_source") == "NVML" else f"{row['power_source']} {row['power_w']:.1f}"
    )


def table_cells(row: dict) -> list[str]:
    idle = row["users"] == 0
    return [
        row["model"],
        row["engine"],
        "—" if idle else _number(row.get("speed_tokens_per_s")),
        _number(row.get("mem_mb"), 0),
        _util_cell(row),
        "TRUE" if row.get("use_cache") else "FALSE",
        _power_cell(row),
        row.get("notes", ""),
        "—" if row.get("failed") else "idle" if idle else str(row["users"]),
        "—" if idle else _number(row.get("requests_per_s"), 2),
        *("—" if idle else _number(row.get(key)) for key in ("ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "e2e_p95_ms")),
        "—" if idle else str(row.get("errors", 0)),
        "—" if idle else _number(row.get("j_per_token"), 2),
        "—" if idle else (f"{row['pct_of_bound']:.1f}%" if row.get("pct_of_bound") is not None else "n/a"),
    ]


def speed_table(rows: list[dict]) -> str:
    header = LOG_COLUMNS + EXTRA_COLUMNS
    return markdown_table([dict(zip(header, table_cells(row))) for row in rows], header)


def write_report(out: Path, rows: list[dict], context: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "speed.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "speed.json").write_text(
        json.dumps({"context": context, "rows": rows}, indent=2, ensure_ascii=False, default=str)
    )
    plots = write_plots(out, rows)
    (out / "speed.md").write_text(markdown_report(rows, context, plots), encoding="utf-8")
    return [out / "speed.md", out / "speed.csv", out / "speed.json", *plots]


def markdown_report(rows: list[dict], context: dict, plots: list[Path]) -> str:
    lines = [
        f"# Speed and memory: {context['model']}",
        "",
        "```",
        context["command"],
        "```",
        "",
        f"Run {context['started']} to {context['finished']} on {context['machine']}.",
        "",
        speed_table(rows),
        "",
    ]
    lines += ["## What the columns hold", ""] + [f"- {note}" for note in context["column_notes"]] + [""]
    for ours, theirs, title in VERSUS:
        versus = baseline_comparison(rows, ours, theirs)
        if versus:
            lines += [
                f"## {title}",
                "",
                f"Same prompts, same load, same client; ratios of the {ours} rows to the {theirs} rows.",
                "",
                markdown_table(
                    [
                        {
                            "Users": v["users"],
                            f"tokens/s {ours}": f"{v['ours']:.1f}",
                            f"tokens/s {theirs}": f"{v['theirs']:.1f}",
                            "ratio": f"{v['ratio']:.2f}",
                            f"TTFT p50 {ours} (ms)": f"{v['ttft_ours']:.0f}",
                            f"TTFT p50 {theirs} (ms)": f"{v['ttft_theirs']:.0f}",
                        }
                        for v in versus
                    ]
                ),
                "",
            ]
    if context.get("roofline"):
        lines += ["## Roofline bound", ""] + [f"- {line}" for line in context["roofline"]] + [""]
    if context.get("failures"):
        lines += ["## Engines that did not run", ""] + [f"- {line}" for line in context["failures"]] + [""]
    lines += ["## Plots", ""] + [f"![{plot.stem}]({plot.name})" for plot in plots] + [""]
    lines += ["Raw files (Locust CSVs and logs, /metrics scrapes before and after each step) are in `raw/`.", ""]
    return "\n".join(lines)


def write_plots(out: Path, rows: list[dict]) -> list[Path]:
    plt = pyplot()
    loaded = [row for row in rows if row["users"] > 0 and row.get("speed_tokens_per_s") is not None]
    engines = list(dict.fromkeys(row["engine"] for row in rows))
    paths = []
    for key, label, name in (
        ("speed_tokens_per_s", "output tokens/s (all users)", "tokens_per_s.png"),
        ("ttft_p95_ms", "TTFT p95 (ms)", "ttft_p95.png"),
    ):
        figure, axes = plt.subplots(figsize=(6.4, 4.2))
        for engine in engines:
            points = sorted(
                (row["users"], row[key])
                for row in loaded
                if row["engine"] == engine and row.get(key) is not None and math.isfinite(row[key])
            )
            if points:
                axes.plot(*zip(*points), marker="o", label=engine)
        axes.set_xscale("log", base=2)
        axes.set_xlabel("concurrent users")
        axes.set_ylabel(label)
        if key == "ttft_p95_ms":
            axes.set_yscale("log")
        axes.grid(True, alpha=0.3)
        if axes.lines:
            axes.legend()
        axes.set_title(f"{label} against concurrency")
        figure.tight_layout()
        figure.savefig(out / name, dpi=110)
        plt.close(figure)
        paths.append(out / name)

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    idle = [next((r.get("mem_mb") for r in rows if r["engine"] == e and r["users"] == 0), None) for e in engines]
    peak = [
        max((r["mem_mb"] for r in rows if r["engine"] == e and r.get("mem_mb") is not None), default=None)
        for e in engines
    ]
    positions = range(len(engines))
    axes.bar([p - 0.2 for p in positions], [v or 0 for v in idle], width=0.4, label="idle")
    axes.bar([p + 0.2 for p in positions], [v or 0 for v in peak], width=0.4, label="peak under load")
    axes.set_xticks(list(positions), engines, rotation=15)
    axes.set_ylabel("MB (server process tree, or GPU)")
    axes.legend()
    axes.set_title("memory per engine")
    figure.tight_layout()
    figure.savefig(out / "memory.png", dpi=110)
    plt.close(figure)
    paths.append(out / "memory.png")
    return paths


# The comparisons a report spells out when it holds both sides: each engine against the outside
# server it must match, and the batched hf engine against the one-at-a-time one.
VERSUS = (
    ("vllm", "vllm-openai", "Our vllm engine against vLLM's own OpenAI server"),
    ("hf-cb", "transformers-serve", "Our hf-cb engine against `transformers serve --continuous-batching`"),
    ("hf-cb", "hf-kv", "hf-cb (continuous batching) against hf-kv (one request at a time)"),
)


def baseline_comparison(rows: list[dict], ours: str = "vllm", theirs: str = "vllm-openai") -> list[dict]:
    def loaded(engine: str) -> dict[int, dict]:
        return {r["users"]: r for r in rows if r["engine"] == engine and r["users"] > 0 and r.get("speed_tokens_per_s")}

    ours, theirs = loaded(ours), loaded(theirs)
    return [
        {
            "users": users,
            "ours": ours[users]["speed_tokens_per_s"],
            "theirs": theirs[users]["speed_tokens_per_s"],
            "ratio": ours[users]["speed_tokens_per_s"] / theirs[users]["speed_tokens_per_s"],
            "ttft_ours": ours[users]["ttft_p50_ms"],
            "ttft_theirs": theirs[users]["ttft_p50_ms"],
        }
        for users in sorted(ours.keys() & theirs.keys())
    ]


def main(argv: list[str] | None = None) -> int:
    """Re-render a report folder from its speed.json (after a change to this module)."""
    import sys

    folder = Path((argv or sys.argv[1:])[0])
    data = json.loads((folder / "speed.json").read_text())
    write_report(folder, data["rows"], data["context"])
    print(folder / "speed.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
