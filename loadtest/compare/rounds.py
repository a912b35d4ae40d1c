"""Repeated rounds of a comparison and what a report may say from them.

On a shared machine the same configuration swings by tens of percent from one minute to the
next, so ``yayi-compare --repeat N`` runs every step N times, the targets of a step
interleaved (A B C, A B C, ...), and reports what the rounds agree on:

- a round row is one load step of one target, as the driver builds it, with ``round`` (1..N)
  and ``seq`` (its place in the whole run, so the raw results show the order steps ran in);
- ``aggregate`` folds a target's rounds at one concurrency into the report's row: the median
  of each figure, speed's min and max beside it;
- ``round_ratios`` pairs two targets' rounds of the same step and round (ours over theirs), so
  a ratio is taken between measurements minutes apart at most, and ``Spread`` is the median of
  those ratios with their min and max;
- ``Spread.reading`` says whether the rounds carry the difference: a ratio whose min-max range
  is wider than its distance from 1.00 is "not distinguishable".

Pure functions on rows (loadtest/compare/rows.py's SpeedRow): the unit tests feed them made-up rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from loadtest.compare.rows import SpeedRow
from loadtest.measure.token_stats import LATENCY_FIELDS

# Figures of a round row whose median over rounds is the reported figure.
MEDIAN_FIELDS = (
    "speed_tokens_per_s",
    "requests_per_s",
    "per_user_tokens_per_s",
    *LATENCY_FIELDS,
    "util_pct",
    "power_w",
    "j_per_token",
    "duration_s",
    "bound_tokens_per_s",
    "pct_of_bound",
)
# Counts over the rounds.
SUM_FIELDS = ("errors", "requests_ok", "requests_cut", "client_tokens", "server_tokens", "energy_j")
# The clocks disagree when their ratios differ by more than this share.
CLOCKS_TOLERANCE = 0.05


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass(frozen=True)
class Spread:
    """The median of some rounds' figures with their min and max (the report's "min–max")."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Spread | None:
        present = [float(v) for v in values if v is not None]
        if not present:
            return None
        return cls(statistics.median(present), min(present), max(present), len(present))

    @property
    def width(self) -> float:
        return self.high - self.low

    def distinguishable(self, reference: float = 1.0) -> bool:
        """More than one round, and the range narrower than the median's distance from ``reference``."""
        return self.n > 1 and self.width < abs(self.median - reference)

    def reading(self, ours: str = "ours", theirs: str = "theirs") -> str:
        """What a ratio (ours over theirs) of these rounds says, in the report's words."""
        if self.n < 2:
            return "one round: no spread measured"
        if not self.distinguishable():
            return "not distinguishable"
        return f"{ours} faster" if self.median > 1 else f"{theirs} faster"

    def cell(self, digits: int = 2) -> str:
        """``1.03 (0.90–1.15)``; a single round shows its one figure."""
        if self.n < 2:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}–{self.high:.{digits}f})"


def aggregate(rounds: list[SpeedRow]) -> SpeedRow:
    """One target's rounds at one concurrency as the report's row: medians, counts summed, the peak
    memory, speed's min and max, and the raw prefix of every round (``raw`` is the first's)."""
    first = rounds[0]
    row = cast(SpeedRow, {key: value for key, value in first.items() if key not in ("round", "seq", "clock")})
    for key in MEDIAN_FIELDS:
        if any(key in r for r in rounds):
            row[key] = median(r.get(key) for r in rounds)
    for key in SUM_FIELDS:
        if any(key in r for r in rounds):
            values = [r.get(key) for r in rounds]
            row[key] = None if any(v is None for v in values) else sum(values)
    memory = [r["mem_mb"] for r in rounds if r.get("mem_mb") is not None]
    row["mem_mb"] = max(memory) if memory else None
    speeds = Spread.of(r.get("speed_tokens_per_s") for r in rounds)
    row["rounds"] = len(rounds)
    row["speed_min"] = speeds.low if speeds else None
    row["speed_max"] = speeds.high if speeds else None
    row["raw_rounds"] = [r.get("raw") for r in rounds]
    row["failures_by_status"] = _joined(r.get("failures_by_status") for r in rounds)
    row["notes"] = _joined(r.get("notes") for r in rounds)
    return row


def _joined(texts: Iterable[str | None]) -> str:
    """Each distinct text once, in the order the rounds gave them."""
    return "; ".join(dict.fromkeys(t for t in texts if t))


def aggregate_all(rounds: list[SpeedRow]) -> dict[tuple[str, int], SpeedRow]:
    """Every (engine, users) of the run's rounds, aggregated, in the order they first ran."""
    grouped: dict[tuple[str, int], list[SpeedRow]] = {}
    for r in sorted(rounds, key=lambda r: r.get("seq", 0)):
        grouped.setdefault((r["engine"], r["users"]), []).append(r)
    return {key: aggregate(group) for key, group in grouped.items()}


def round_ratios(rounds: list[dict], ours: str, theirs: str, key: str = "speed_tokens_per_s") -> dict[int, list[float]]:
    """Per concurrency, ours over theirs for each round both measured (the same round number)."""
    figures: dict[tuple[str, int, int], float] = {
        (r["engine"], r["users"], r.get("round", 1)): r[key] for r in rounds if r.get(key)
    }
    ratios: dict[int, list[float]] = {}
    for (engine, users, number), value in sorted(figures.items(), key=lambda item: (item[0][1], item[0][2])):
        if engine != ours:
            continue
        other = figures.get((theirs, users, number))
        if other:
            ratios.setdefault(users, []).append(value / other)
    return ratios


def clocks_differ(first: Spread | None, second: Spread | None, tolerance: float = CLOCKS_TOLERANCE) -> float | None:
    """How far apart two clocks' median ratios are (second over first, minus 1), when more than the
    tolerance; None when they agree or one is missing."""
    if first is None or second is None or not first.median:
        return None
    gap = second.median / first.median - 1
    return gap if abs(gap) > tolerance else None
