"""``python -m loadtest.capacity.tune --engine ENGINE [capacity flags...]`` (``make tune``): which of an
engine's settings takes the most requests at the target on this machine.

The engine at its defaults and one variant per other value of each knob (one knob at a time: the
knobs' effects on a CPU are not independent, but a full grid is hours), the values drawn from the
machine's size: its cores for thread counts.  Every variant is a ``--variant`` of one capacity run
(loadtest/capacity/driver.py), the same trace, the same search, the variants interleaved at each
rate, without peers, overload steps or the second clock (give ``--baseline`` and the others after
``--engine`` to have them).  Its report is the capacity report; this adds ``tune.md``: the knob,
its value, the capacity, and whether the default stands.

A value beats the default only when its capacity is higher by more than the search's bracket
(``--tolerance``): within it, the two were not told apart, and the default stands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from loadtest.capacity import driver
from loadtest.capacity.config import parse as parse_capacity
from loadtest.measure.report_folder import default_out


@dataclass(frozen=True)
class Knob:
    flag: str  # yayi-serve's flag
    default: str  # what the engine runs without the flag, in words
    values: tuple[str, ...]  # the other values tried


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_counts(n: int) -> tuple[str, ...]:
    """Fewer threads than cores: one core left to the front end and the scheduler, and half of them."""
    return tuple(str(t) for t in sorted({n - 1, n // 2} - {0, n}, reverse=True))


def knobs(engine: str, n: int) -> list[Knob]:
    """The knobs tried for ``engine`` on a machine of ``n`` cores."""
    if engine == "hf-cb":
        return [
            Knob("--torch-threads", f"{n} (one per core)", thread_counts(n)),
            Knob("--max-batch-tokens", "1024 on a CPU", ("256", "4096")),
        ]
    if engine == "llama-cpp":
        return [
            Knob("--threads", f"{n} (all cores)", thread_counts(n)),
            Knob("--batch-size", "2048", ("512",)),
        ]
    raise SystemExit(
        f"tune: error: no knobs for engine {engine!r}; tune hf-cb or llama-cpp (vllm's thread binding is an "
        "environment setting: make capacity measures it as vllm-openai beside vllm-openai-matched)"
    )


def variants(engine: str, n: int) -> list[tuple[str, Knob, str]]:
    """(label, knob, value) for every value tried."""
    found = []
    for knob in knobs(engine, n):
        for value in knob.values:
            found.append((f"{engine}{knob.flag.removeprefix('-')}-{value}", knob, value))
    return found


def capacity_argv(tried: dict[str, list], rest: list[str], out: Path | str) -> list[str]:
    """The capacity run's command line: each engine (``tried``'s keys) and its variants."""
    names = [name for engine, found in tried.items() for name in (engine, *(label for label, _, _ in found))]
    argv = ["--engines", ",".join(names)]
    for engine, found in tried.items():
        for label, knob, value in found:
            argv += ["--variant", f"{label}={engine} {knob.flag} {value}"]
    # Our engine alone, searched: given again after these, the caller's own flags win.
    argv += ["--baseline", "none", "--overload", "0", "--max-queue-wait", "-1", "--second-clock", "false"]
    # The folder once: the caller's own --out, or the one chosen for them.
    return argv + rest + ([] if "--out" in rest else ["--out", str(out)])


def verdict(engine: str, tried, capacities: dict[str, float | None], tolerance: float, n: int) -> list[str]:
    """The tune.md lines: one row per value, then which value wins."""
    base = capacities.get(engine)
    lines = [
        f"# Tuning {engine} on this machine ({n} cores)",
        "",
        "| knob | value | capacity (req/s) | over the default |",
        "|---|---|---:|---:|",
    ]
    for knob in knobs(engine, n):
        lines.append(f"| {knob.flag} | {knob.default} (default) | {_rps(base)} | 1.00 |")
        for label, k, value in tried:
            if k == knob:
                c = capacities.get(label)
                lines.append(
                    f"| {knob.flag} | {value} | {_rps(c)} | {c / base:.2f} |"
                    if c and base
                    else f"| {knob.flag} | {value} | {_rps(c)} | n/a |"
                )
    better = [
        (capacities[label] / base, label, knob, value)
        for label, knob, value in tried
        if base and capacities.get(label) and capacities[label] > base * (1 + tolerance)
    ]
    lines.append("")
    if base is None:
        lines.append("The default met the target at no rate tried: nothing is compared against it.")
    elif not better:
        lines.append(
            f"The defaults stand: no value took more than {1 + tolerance:.2g}x the default's "
            f"{base:.3g} req/s (the search's bracket, --tolerance {tolerance:g})."
        )
    else:
        ratio, label, knob, value = max(better)
        lines.append(f"Better than the default: `{knob.flag} {value}` ({label}), {ratio:.2f}x its capacity.")
    return lines + [""]


def _rps(value: float | None) -> str:
    return f"{value:.3g}" if value else "none met the target"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.capacity.tune",
        description="Which of an engine's settings takes the most requests at the target on this machine; "
        "every other flag is the capacity driver's (python -m loadtest.capacity --help).",
    )
    parser.add_argument("--engine", required=True, help="hf-cb, llama-cpp, or both comma-separated (one run)")
    args, rest = parser.parse_known_args(argv)
    n = cores()
    tried = {engine: variants(engine, n) for engine in args.engine.split(",") if engine}
    out = Path(next((rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--out"), "") or default_out("tune"))
    capacity_args = capacity_argv(tried, rest, out)
    config = parse_capacity(capacity_args)  # refuses a bad flag before any server starts
    driver.main(capacity_args)
    table = json.loads((out / "capacity.json").read_text())
    capacities = {row["target"]: row["capacity_rps"] for row in table}
    lines = [
        line for engine, found in tried.items() for line in verdict(engine, found, capacities, config.tolerance, n)
    ]
    text = "\n".join(lines) + "\n"
    (out / "tune.md").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
