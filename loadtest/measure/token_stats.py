"""Per-request samples of a streaming load test and the serving-benchmark summary built from them.

The summary's columns are the ones vLLM's and SGLang's serving benchmarks print (output
tokens/s, TTFT, inter-token latency, end-to-end latency percentiles), so a figure from
here can be laid beside one from those tools.  Percentiles come from the raw samples, not
from Locust's rounded response-time buckets.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

OK = "OK"
CUT = "CUT"  # still streaming when the load test ended: its tokens count, its latency does not


@dataclass
class RequestSample:
    started: float  # wall clock (time.time), so samples from several workers share a timeline
    duration_s: float
    tokens: int  # token ids received in chunks
    status: str = OK  # OK, CUT, or the gRPC status code's name
    ttft_s: float | None = None
    completion_tokens: int | None = None  # the server's own count, from the final chunk's usage
    itl_s: list[float] = field(default_factory=list)

    @property
    def ended(self) -> float:
        return self.started + self.duration_s

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict) -> RequestSample:
        return cls(**data)


def percentile(values: list[float], q: float) -> float:
    """The one percentile every "p50/p95/p99" column in loadtest/ and bench/ is computed with.

    Scale: ``q`` is in percent, 0 to 100 (95 for p95), not a 0-1 fraction.
    Interpolation: linear between the two closest ranks of the sorted values, at rank
    (n - 1) * q / 100: numpy's default ("linear"), so p50 is the median.  NaN for no values,
    which a report shows as n/a rather than as a made-up 0.
    """
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# The per-request latency percentiles a summary holds, and so every report row.
LATENCY_FIELDS = (
    "ttft_p50_ms",
    "ttft_p95_ms",
    "ttft_p99_ms",
    "itl_p50_ms",
    "itl_p95_ms",
    "e2e_p50_ms",
    "e2e_p95_ms",
    "e2e_p99_ms",
)

SUMMARY_COLUMNS = [
    "users",
    "requests_ok",
    "requests_failed",
    "requests_cut",
    "duration_s",
    "output_tokens",
    "output_tokens_per_s",
    "per_user_tokens_per_s",
    "requests_per_s",
    *LATENCY_FIELDS,
    "failures_by_status",
]


def summarize(samples: list[RequestSample], users: int | None = None) -> dict:
    """Throughput over the whole window (first request sent to last token received); latencies
    over the requests that finished.  A request cut off by the end of the test adds its tokens
    to the throughput but no latency, since its end was chosen by the load test, not the server."""
    finished = [s for s in samples if s.status == OK]
    failed = [s for s in samples if s.status not in (OK, CUT)]
    cut = [s for s in samples if s.status == CUT]
    window = (max(s.ended for s in samples) - min(s.started for s in samples)) if samples else 0.0
    tokens = sum(s.tokens for s in samples)
    by_status: dict[str, int] = {}
    for sample in failed:
        by_status[sample.status] = by_status.get(sample.status, 0) + 1
    ms = 1000.0
    ttft = [s.ttft_s for s in finished if s.ttft_s is not None]
    itl = [gap for s in finished for gap in s.itl_s]
    e2e = [s.duration_s for s in finished]
    per_user = [s.tokens / s.duration_s for s in finished if s.duration_s > 0]
    return {
        "users": users if users is not None else "",
        "requests_ok": len(finished),
        "requests_failed": len(failed),
        "requests_cut": len(cut),
        "duration_s": round(window, 3),
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / window if window > 0 else 0.0,
        "per_user_tokens_per_s": sum(per_user) / len(per_user) if per_user else math.nan,
        "requests_per_s": len(finished) / window if window > 0 else 0.0,
        "ttft_p50_ms": percentile(ttft, 50) * ms,
        "ttft_p95_ms": percentile(ttft, 95) * ms,
        "ttft_p99_ms": percentile(ttft, 99) * ms,
        "itl_p50_ms": percentile(itl, 50) * ms,
        "itl_p95_ms": percentile(itl, 95) * ms,
        "e2e_p50_ms": percentile(e2e, 50) * ms,
        "e2e_p95_ms": percentile(e2e, 95) * ms,
        "e2e_p99_ms": percentile(e2e, 99) * ms,
        "failures_by_status": ";".join(f"{status}={count}" for status, count in sorted(by_status.items())),
    }


def write_summary_csv(summary: dict, path: str | Path) -> None:
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerow({key: _round(summary[key]) for key in SUMMARY_COLUMNS})


def read_summary_csv(path: str | Path) -> dict:
    with open(path, newline="") as source:
        row = next(csv.DictReader(source))
    return {key: _parse(value) for key, value in row.items()}


def format_summary(summary: dict) -> str:
    lines = [
        f"requests: {summary['requests_ok']} ok, {summary['requests_failed']} failed"
        f"{' (' + summary['failures_by_status'] + ')' if summary['failures_by_status'] else ''}, "
        f"{summary['requests_cut']} cut by the end of the test, over {summary['duration_s']:.1f} s",
        f"output tokens/s: {summary['output_tokens_per_s']:.1f} total, "
        f"{summary['per_user_tokens_per_s']:.1f} per user ({summary['output_tokens']} tokens)",
        f"TTFT ms:    p50 {summary['ttft_p50_ms']:.1f}  p95 {summary['ttft_p95_ms']:.1f}  "
        f"p99 {summary['ttft_p99_ms']:.1f}",
        f"ITL ms:     p50 {summary['itl_p50_ms']:.1f}  p95 {summary['itl_p95_ms']:.1f}",
        f"request ms: p50 {summary['e2e_p50_ms']:.1f}  p95 {summary['e2e_p95_ms']:.1f}  "
        f"p99 {summary['e2e_p99_ms']:.1f}",
    ]
    return "\n".join(lines)


def _round(value):
    return round(value, 3) if isinstance(value, float) and math.isfinite(value) else value


def _parse(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
