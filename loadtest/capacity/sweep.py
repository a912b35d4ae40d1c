"""The target (SLO), one step's figures, and the rate search.

The target is a set of terms ``metric_pNN<=bound`` (``ttft_p99=2s,tpot_p99=200ms``; metrics
ttft, tpot, e2e).  A request is good when it was answered and each of its own figures is within
every bound (vLLM's ``--goodput``); a step meets the target when each term's percentile, over every
request sent (a refused or failed one counting as infinitely late), is within its bound.

The search, per target: start low, multiply the rate while steps meet the target and the server
keeps up, then bisect (geometrically) between the last rate that passed and the first that
failed until they are within the tolerance.  A step fails when it misses the target or the server
saturates: its answers stop following the offered rate (``falls_behind``), or the wait for a first
token grows across the step (``queue_grew``).
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass

from loadtest.capacity.client import ERROR, OK, REFUSED, TIMEOUT, Sample, Step, percentile

METRICS = ("ttft", "tpot", "e2e")
# MLPerf Inference's server scenario for Llama-2-70B.
DEFAULT_SLO = "ttft_p99=2s,tpot_p99=200ms"
# Answers below this share of the requests sent: the server no longer follows the offered rate.  Read only
# from steps of at least RATE_SAMPLE answers: over fewer, the spread of latencies alone moves it that much.
FOLLOWS = 0.8
RATE_SAMPLE = 20
# The wait for a first token grew when the later half's median TTFT (past the ramp-up) is this much longer than
# the earlier half's.  Absolute, not a ratio: a queue that has grown since the step began has already
# lengthened the earlier half's wait, and what a user feels is seconds.  Measured here, steps that kept up
# moved by 0.06 s at most, steps past capacity by 0.8 s and more (docs/loadtest.md).
QUEUE_GROWTH_S = 0.25


@dataclass(frozen=True)
class Term:
    metric: str
    percentile: float
    bound_s: float

    @property
    def name(self) -> str:
        return f"{self.metric}_p{self.percentile:g}"


def parse_duration_s(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*", text)
    if not match:
        raise ValueError(f"a bound is a number of seconds or milliseconds (2s, 200ms), got {text!r}")
    value = float(match.group(1))
    return value / 1000 if match.group(2) == "ms" else value


def parse_slo(text: str) -> tuple[Term, ...]:
    terms = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, bound = part.partition("=")
        match = re.fullmatch(r"(ttft|tpot|e2e)_p(\d+(?:\.\d+)?)", name.strip())
        if not sep or not match or not 0 < float(match.group(2)) <= 100:
            raise ValueError(
                f"a target term is METRIC_pNN=BOUND with METRIC one of {', '.join(METRICS)} "
                f"(e.g. {DEFAULT_SLO}), got {part!r}"
            )
        terms.append(Term(match.group(1), float(match.group(2)), parse_duration_s(bound)))
    if not terms:
        raise ValueError(f"the target needs at least one term, e.g. {DEFAULT_SLO}")
    return tuple(terms)


def describe_slo(terms: tuple[Term, ...]) -> str:
    return ", ".join(f"P{t.percentile:g} {t.metric.upper()} ≤ {t.bound_s * 1000:g} ms" for t in terms)


def value(sample: Sample, metric: str) -> float | None:
    return {"ttft": sample.ttft_s, "tpot": sample.tpot_s, "e2e": sample.e2e_s}[metric]


def good(sample: Sample, terms: tuple[Term, ...]) -> bool:
    if sample.status != OK:
        return False
    for term in terms:
        figure = value(sample, term.metric)
        # A one-token answer has no TPOT: nothing to miss.
        if figure is not None and figure > term.bound_s:
            return False
    return True


def _figures(samples: list[Sample], metric: str, failed_as_inf: bool) -> list[float]:
    figures = []
    for sample in samples:
        figure = value(sample, metric)
        if sample.status == OK and figure is not None:
            figures.append(figure)
        elif sample.status != OK and failed_as_inf:
            figures.append(math.inf)
    return figures


def rate_of(times: list[float]) -> float:
    """Events per second from their times: (n - 1) over the span, the rate at which they came."""
    if len(times) < 2:
        return 0.0
    span = max(times) - min(times)
    return (len(times) - 1) / span if span > 0 else math.inf


def _past_ramp_up(samples: list[Sample]) -> tuple[list[Sample], float]:
    """The answered requests sent once the step is past its ramp-up (one median E2E after the first send:
    in an open loop the batch fills over that time even when the server keeps up), and that median."""
    answered = sorted((s for s in samples if s.status == OK and s.e2e_s is not None), key=lambda s: s.sent_s)
    if not answered:
        return [], 0.0
    typical = statistics.median(s.e2e_s for s in answered if s.e2e_s is not None)
    first = min(s.sent_s for s in samples)
    return [s for s in answered if s.sent_s >= first + typical], typical


def queue_grew(samples: list[Sample]) -> bool:
    """Whether the wait for a first token grew across the step, once past the ramp-up: a queue forming in
    front of the server.  Not the count in flight: by Little's law it also grows with a burst of Poisson
    arrivals, and with the time per token of a batch that fills, and it is highest on the slowest server;
    the wait for a first token only grows when requests wait for the server."""
    settled, _ = _past_ramp_up(samples)
    ttfts = [s.ttft_s for s in settled if s.ttft_s is not None]
    if len(ttfts) < 8:
        return False  # too few after the ramp-up to tell growth from noise
    half = len(ttfts) // 2
    earlier, later = statistics.median(ttfts[:half]), statistics.median(ttfts[half:])
    return later - earlier > QUEUE_GROWTH_S


def falls_behind(samples: list[Sample]) -> bool:
    """Whether answers came out slower than requests went in: the answers that came within the span of the
    sends shifted one median E2E later (the same length of time, a typical latency on) against the requests
    sent within it.  Answers counted over their own span instead stretch with any spread of latencies, and a
    short step then looks saturated although every request met the target."""
    _, typical = _past_ramp_up(samples)
    done = [s for s in samples if s.status == OK and s.e2e_s is not None]
    if len(done) < RATE_SAMPLE:
        return False
    sends = sorted(s.sent_s for s in samples)
    span = sends[-1] - sends[0]
    if span <= 0:
        return False
    start, end = sends[0] + typical, sends[-1] + typical
    came = sum(start <= s.sent_s + s.e2e_s <= end for s in done)
    return came < FOLLOWS * (len(sends) - 1)


def summarize(step: Step, terms: tuple[Term, ...]) -> dict:
    """One step's row: rates, latency percentiles, goodput, the verdicts (meets, saturated, valid)."""
    samples = step.samples
    answered = [s for s in samples if s.status == OK]
    sent_rps = rate_of([s.sent_s for s in samples])
    # The rate answers came out at: at steady state the arrival rate, once saturated the service rate.
    achieved_rps = rate_of([s.sent_s + s.e2e_s for s in answered if s.e2e_s is not None])
    if len(answered) < 2:
        achieved_rps = 0.0
    tokens = sum(s.tokens for s in answered)
    span = max((s.sent_s + (s.e2e_s or 0.0) for s in answered), default=0.0) - min(
        (s.sent_s for s in samples), default=0.0
    )
    n_good = sum(good(s, terms) for s in samples)
    row: dict = {
        "offered_rps": step.rate,
        "sent_rps": sent_rps,
        "achieved_rps": min(achieved_rps, sent_rps * 10),  # never inf in a table
        "output_tps": tokens / span if span > 0 else 0.0,
        "requests": len(samples),
        "ok": len(answered),
        "refused": sum(s.status == REFUSED for s in samples),
        "errors": sum(s.status == ERROR for s in samples),
        "timeouts": sum(s.status == TIMEOUT for s in samples),
        "good_pct": 100.0 * n_good / len(samples) if samples else 0.0,
        "lag_p99_s": step.lag_p99_s,
        "valid": step.valid,
    }
    row["goodput_rps"] = row["achieved_rps"] * n_good / len(answered) if answered else 0.0
    # Good requests over the whole step, first send to last answer: vllm bench serve's definition.
    row["goodput_run_rps"] = n_good / step.duration_s if step.duration_s > 0 else 0.0
    for metric in (*METRICS, "itl"):
        if metric == "itl":
            figures = [gap for s in answered for gap in s.itls_s]
        else:
            figures = _figures(samples, metric, failed_as_inf=False)
        for q in (50, 90, 99):
            row[f"{metric}_p{q}_s"] = percentile(figures, q)
    misses = []
    for term in terms:
        figure = percentile(_figures(samples, term.metric, failed_as_inf=True), term.percentile)
        if figure is None or figure > term.bound_s:
            misses.append(term.name)
    row["saturated"] = bool(samples) and (falls_behind(samples) or queue_grew(samples))
    row["meets"] = not misses and not row["saturated"] and bool(answered)
    row["why"] = ", ".join(misses + (["saturated"] if row["saturated"] else []))
    return row


class Search:
    """One target's rate search; ``next_rate()`` is None when it is done, ``record`` says how a rate went."""

    def __init__(self, start: float, factor: float = 2.0, maximum: float = 64.0, tolerance: float = 0.1) -> None:
        if start <= 0 or factor <= 1 or maximum < start or tolerance <= 0:
            raise ValueError("the search needs start > 0, factor > 1, maximum >= start and tolerance > 0")
        self.start, self.factor, self.maximum, self.tolerance = start, factor, maximum, tolerance
        self.passed: float | None = None
        self.failed: float | None = None
        self.history: list[tuple[float, bool]] = []
        self.stopped = ""
        self._next: float | None = start

    def next_rate(self) -> float | None:
        return self._next

    def record(self, rate: float, passed: bool) -> None:
        self.history.append((rate, passed))
        if passed:
            # A pass above a rate that already failed is noise: capacity stays below the first failure.
            if self.failed is None or rate < self.failed:
                self.passed = rate if self.passed is None else max(self.passed, rate)
        else:
            self.failed = rate if self.failed is None else min(self.failed, rate)
        if self.failed is None:
            following = rate * self.factor
            self._next = following if following <= self.maximum * (1 + 1e-9) else None
            return
        low = self.passed if self.passed is not None else self.failed / self.factor**2
        if self.passed is None and self.failed <= self.start / self.factor**3:
            self._next = None  # fails far below the start: nothing to find here
        elif self.failed / low <= 1 + self.tolerance:
            self._next = None
        else:
            self._next = math.sqrt(low * self.failed)

    def steps_left(self) -> int:
        """About how many rates are still to try (the progress line's time left): the climb to the maximum,
        if nothing has failed yet, and the bisection's halvings of the bracket down to the tolerance."""
        if self._next is None:
            return 0
        if self.failed is None:
            climb = math.ceil(math.log(self.maximum / self._next) / math.log(self.factor)) + 1
            return climb + math.ceil(math.log2(math.log(self.factor) / math.log(1 + self.tolerance)))
        low = self.passed if self.passed is not None else self.failed / self.factor**2
        return max(1, math.ceil(math.log2(math.log(self.failed / low) / math.log(1 + self.tolerance))))

    def stop(self, why: str) -> None:
        """Ends the search without a verdict on the last rate (the client fell behind: an invalid step)."""
        self.stopped = why
        self._next = None

    @property
    def capacity(self) -> float | None:
        """The highest rate that passed below the first that failed."""
        return self.passed
