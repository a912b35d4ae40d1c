"""The comparison report: the inference log's table (docs/design.md) as speed.md, speed.csv, speed.json, plots.

The log's columns come first and keep their names.  On a CPU the "GPU" columns say what they
hold ("CPU 48%", "n/a (no RAPL)"): a blank or a made-up number would be read as a GPU figure.
The cells are written here; the table itself by loadtest/measure/tables.py, as every other report's.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from loadtest.compare.rounds import Spread, clocks_differ, median, round_ratios
from loadtest.compare.rows import ClockRow, SpeedRow
from loadtest.measure.plots import pyplot
from loadtest.measure.tables import markdown_table
from loadtest.measure.token_stats import LATENCY_FIELDS

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

# The columns of speed.csv, in their order: each a key of SpeedRow (loadtest/compare/rows.py).
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
    "rounds",
    "speed_min",
    "speed_max",
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


def _speed_cell(row: dict) -> str:
    """The median tokens/s, and over several rounds their min–max in brackets."""
    speed = _number(row.get("speed_tokens_per_s"))
    if (row.get("rounds") or 1) > 1 and row.get("speed_min") is not None:
        return f"{speed} ({_number(row['speed_min'])}–{_number(row['speed_max'])})"
    return speed


def table_cells(row: dict) -> list[str]:
    idle = row["users"] == 0
    return [
        row["model"],
        row["engine"],
        "—" if idle else _speed_cell(row),
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


def write_report(
    out: Path,
    rows: list[SpeedRow],
    context: dict,
    rounds: list[SpeedRow] | None = None,
    clock_rounds: list[ClockRow] | None = None,
) -> list[Path]:
    """``rounds``: every Locust step of every round, in the order they ran (``seq``); ``clock_rounds``:
    the second clock's.  Without them (a report from before rounds) each loaded row is its own round."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "speed.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    rounds = rounds if rounds is not None else [r for r in rows if r.get("users")]
    clock_rounds = clock_rounds or []
    (out / "speed.json").write_text(
        json.dumps(
            {"context": context, "rows": rows, "rounds": rounds, "clock_rounds": clock_rounds},
            indent=2,
            ensure_ascii=False,
            default=str,
        )
    )
    plots = write_plots(out, rows)
    (out / "speed.md").write_text(markdown_report(rows, context, plots, rounds, clock_rounds), encoding="utf-8")
    return [out / "speed.md", out / "speed.csv", out / "speed.json", *plots]


def markdown_report(
    rows: list[dict],
    context: dict,
    plots: list[Path],
    rounds: list[dict] | None = None,
    clock_rounds: list[dict] | None = None,
) -> str:
    rounds = rounds if rounds is not None else [r for r in rows if r.get("users")]
    clock_rounds = clock_rounds or []
    repeat = context.get("repeat", 1)
    lines = [
        f"# Speed and memory: {context['model']}",
        "",
        "```",
        context["command"],
        "```",
        "",
        f"Run {context['started']} to {context['finished']} on {context['machine']}.",
        "",
    ]
    if context.get("together"):
        lines += [f"Servers: {context['together']}. " + rounds_sentence(repeat), ""]
    lines += [speed_table(rows), ""]
    lines += ["## What the columns hold", ""] + [f"- {note}" for note in context["column_notes"]] + [""]
    cautions: list[str] = []
    # The run's own pairs (VERSUS and its variants, loadtest/compare/variants.py); a report from before them, VERSUS.
    for ours, theirs, title in context.get("versus") or VERSUS:
        table = ratio_rows(rows, rounds, clock_rounds, ours, theirs)
        if table:
            lines += [
                f"## {title}",
                "",
                f"Same prompts, same load, same client; {ratio_sentence(ours, theirs, repeat)}",
                "",
                markdown_table(table),
                "",
            ]
            cautions += ratio_cautions(table, ours, theirs)
    if clock_rounds:
        lines += ["## Second clock: guidellm", "", *second_clock_text(rows, clock_rounds), ""]
    if cautions:
        lines += ["## What the rounds do not carry", "", *[f"- {line}" for line in cautions], ""]
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
# server it must match (vllm, hf-cb twice, llama-cpp), and the batched hf engine against the
# one-at-a-time one.
VERSUS = (
    ("vllm", "vllm-openai", "Our vllm engine against vLLM's own OpenAI server, as its users start it"),
    ("vllm", "vllm-openai-matched", "Our vllm engine against vLLM's own OpenAI server with the same thread binding"),
    (
        "hf-cb",
        "transformers-serve-matched",
        "Our hf-cb engine against `transformers serve --continuous-batching` with hf-cb's KV cache",
    ),
    (
        "hf-cb",
        "transformers-serve-defaults",
        "Our hf-cb engine against `transformers serve --continuous-batching` left to its own cache defaults",
    ),
    ("hf-cb", "hf-kv", "hf-cb (continuous batching) against hf-kv (one request at a time)"),
    (
        "llama-cpp",
        "llama-server",
        "Our llama-cpp engine against llama.cpp's own llama-server (the same GGUF, threads and slots)",
    ),
    (
        "llama-cpp",
        "llama-server-defaults",
        "Our llama-cpp engine against llama.cpp's own llama-server on the same GGUF, as its users start it",
    ),
)


def rounds_sentence(repeat: int) -> str:
    if repeat > 1:
        return (
            f"Each step ran {repeat} times, the servers of a group interleaved (A B C, A B C, ...); "
            "a figure is the median of its rounds with their min–max in brackets."
        )
    return "Each step ran once: no spread was measured, so no ratio here carries a claim on its own."


def ratio_sentence(ours: str, theirs: str, repeat: int) -> str:
    if repeat > 1:
        return (
            f"each round's {ours} tokens/s over the same round's {theirs} tokens/s, then the median of those "
            f"{repeat} ratios and their min–max."
        )
    return f"ratios of the {ours} rows to the {theirs} rows (one round)."


def ratio_rows(rows: list[dict], rounds: list[dict], clock_rounds: list[dict], ours: str, theirs: str) -> list[dict]:
    """Per concurrency: both sides' median tokens/s, the median of the per-round ratios with their
    min–max and what they say, TTFT medians, and the second clock's ratio where it ran."""
    loaded = {(r["engine"], r["users"]): r for r in rows if r.get("users") and r.get("speed_tokens_per_s")}
    ratios = round_ratios(rounds, ours, theirs)
    clock = round_ratios(clock_rounds, ours, theirs)
    table = []
    for users in sorted(ratios):
        spread = Spread.of(ratios[users])
        if spread is None or (ours, users) not in loaded or (theirs, users) not in loaded:
            continue
        row = {
            "Users": users,
            f"tokens/s {ours}": f"{loaded[(ours, users)]['speed_tokens_per_s']:.1f}",
            f"tokens/s {theirs}": f"{loaded[(theirs, users)]['speed_tokens_per_s']:.1f}",
            "ratio (median)": f"{spread.median:.2f}",
            "ratio min–max": f"{spread.low:.2f}–{spread.high:.2f}" if spread.n > 1 else "—",
            "rounds": spread.n,
            "reads as": spread.reading(ours, theirs),
        }
        if clock_rounds:
            other = Spread.of(clock.get(users, []))
            gap = clocks_differ(spread, other)
            row["guidellm ratio"] = other.cell() if other else "n/a"
            row["clocks"] = "n/a" if other is None else (f"differ by {gap:+.1%}" if gap is not None else "agree")
        row[f"TTFT p50 {ours} (ms)"] = _number(loaded[(ours, users)].get("ttft_p50_ms"), 0)
        row[f"TTFT p50 {theirs} (ms)"] = _number(loaded[(theirs, users)].get("ttft_p50_ms"), 0)
        table.append(row)
    return table


def ratio_cautions(table: list[dict], ours: str, theirs: str) -> list[str]:
    """The steps whose rounds do not carry their ratio, and those whose two clocks disagree."""
    lines = []
    for row in table:
        step = f"{ours} / {theirs} at {row['Users']} user{'s' if row['Users'] != 1 else ''}"
        if row["reads as"] == "not distinguishable":
            lines.append(
                f"{step}: ratio {row['ratio (median)']} with range {row['ratio min–max']}, wider than its "
                "distance from 1.00: not distinguishable"
            )
        elif row["reads as"].startswith("one round"):
            lines.append(f"{step}: ratio {row['ratio (median)']} from one round: no spread measured")
        if str(row.get("clocks", "")).startswith("differ"):
            lines.append(
                f"{step}: Locust's ratio {row['ratio (median)']} and guidellm's {row['guidellm ratio']} "
                f"{row['clocks']} (more than 5 %)"
            )
    return lines


def second_clock_text(rows: list[dict], clock_rounds: list[dict]) -> list[str]:
    """The second clock's own figures per target and step, beside Locust's."""
    loaded = {(r["engine"], r["users"]): r for r in rows if r.get("users") and r.get("speed_tokens_per_s")}
    grouped: dict[tuple[str, int], list[dict]] = {}
    for r in sorted(clock_rounds, key=lambda r: r.get("seq", 0)):
        grouped.setdefault((r["engine"], r["users"]), []).append(r)
    table = []
    for (engine, users), runs in grouped.items():
        speed = Spread.of(r.get("speed_tokens_per_s") for r in runs)
        locust = loaded.get((engine, users), {})
        table.append(
            {
                "Engine": engine,
                "Users": users,
                "guidellm tokens/s": speed.cell(1) if speed else "n/a",
                "Locust tokens/s": _speed_cell(locust) if locust else "n/a",
                "guidellm TTFT p50 (ms)": _number(median(r.get("ttft_p50_ms") for r in runs), 0),
                "requests ok": sum(r.get("requests_ok") or 0 for r in runs),
                "failed": sum(r.get("requests_failed") or 0 for r in runs),
                "rounds": len(runs),
                "notes": "; ".join(dict.fromkeys(r["notes"] for r in runs if r.get("notes"))),
            }
        )
    return [
        "guidellm's `concurrent` profile (as many streams as Users, each sending its next request when the last "
        "ends) with the same prompts, length and duration, through streaming /v1/completions: our engines "
        "through the HTTP front end, the outside servers as Locust reaches them. Its tokens/s is its own "
        "output tokens/s; raw/*_clock_guidellm.json holds its full output.",
        "",
        markdown_table(table),
    ]


def baseline_comparison(rows: list[dict], ours: str = "vllm", theirs: str = "vllm-openai") -> list[dict]:
    def loaded(engine: str) -> dict[int, dict]:
        return {r["users"]: r for r in rows if r["engine"] == engine and r["users"] > 0 and r.get("speed_tokens_per_s")}

    mine, peer = loaded(ours), loaded(theirs)
    return [
        {
            "users": users,
            "ours": mine[users]["speed_tokens_per_s"],
            "theirs": peer[users]["speed_tokens_per_s"],
            "ratio": mine[users]["speed_tokens_per_s"] / peer[users]["speed_tokens_per_s"],
            "ttft_ours": mine[users]["ttft_p50_ms"],
            "ttft_theirs": peer[users]["ttft_p50_ms"],
        }
        for users in sorted(mine.keys() & peer.keys())
    ]


def main(argv: list[str] | None = None) -> int:
    """Re-render a report folder from its speed.json (after a change to this module)."""
    import sys

    folder = Path((argv or sys.argv[1:])[0])
    data = json.loads((folder / "speed.json").read_text())
    write_report(folder, data["rows"], data["context"], data.get("rounds"), data.get("clock_rounds"))
    print(folder / "speed.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
