"""One seeded trace per run: each request's arrival offset, prompt and exact output length.

The trace is built once, before any load, at a unit rate (one request per second on average);
a step at ``rate`` replays the same requests with every offset divided by ``rate``, so each
target and each rate serves exactly the same work in the same order.  Arrival processes follow
``vllm bench serve``: Poisson (exponential gaps, coefficient of variation 1), constant (CV 0)
and gamma with a burstiness factor (shape = burstiness, scale = 1 / (rate * burstiness): the
mean gap stays 1 / rate and the CV is 1 / sqrt(burstiness)).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

ARRIVALS = ("poisson", "constant", "gamma")


@dataclass(frozen=True)
class Request:
    index: int
    offset_s: float  # at the unit rate; Trace.at(rate) scales it
    prompt: str
    output_tokens: int
    prompt_tokens: int | None = None  # known where the prompt was cut with the model's tokenizer


@dataclass(frozen=True)
class Trace:
    requests: tuple[Request, ...]
    arrival: str
    burstiness: float
    seed: int
    workload: str

    def at(self, rate: float, count: int | None = None) -> list[tuple[float, Request]]:
        """The first ``count`` requests (all by default) with their offsets at ``rate`` requests/s."""
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        chosen = self.requests if count is None else self.requests[:count]
        return [(request.offset_s / rate, request) for request in chosen]

    def save(self, path: Path) -> None:
        head = {"arrival": self.arrival, "burstiness": self.burstiness, "seed": self.seed, "workload": self.workload}
        with open(path, "w") as handle:
            handle.write(json.dumps(head) + "\n")
            for request in self.requests:
                handle.write(json.dumps(asdict(request)) + "\n")


def gaps(arrival: str, count: int, burstiness: float, rng: random.Random) -> list[float]:
    """``count`` inter-arrival gaps with mean 1 s (the unit rate)."""
    if arrival == "poisson":
        return [rng.expovariate(1.0) for _ in range(count)]
    if arrival == "constant":
        return [1.0] * count
    if arrival == "gamma":
        if burstiness <= 0:
            raise ValueError(f"burstiness must be positive, got {burstiness}")
        return [rng.gammavariate(burstiness, 1.0 / burstiness) for _ in range(count)]
    raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}, got {arrival!r}")


def build(workload, count: int, arrival: str = "poisson", burstiness: float = 1.0, seed: int = 0) -> Trace:
    """``workload``: a loadtest.capacity.workloads workload (its ``name`` and ``draw(count, rng)``)."""
    if count < 1:
        raise ValueError(f"a trace needs at least one request, got {count}")
    # One generator for arrivals, another for the work: the same seed gives the same prompts
    # whichever arrival process is chosen.
    arrivals = gaps(arrival, count, burstiness, random.Random(f"{seed}-arrivals"))
    drawn = workload.draw(count, random.Random(f"{seed}-work"))
    offsets, now = [], 0.0
    for gap in arrivals:
        offsets.append(now)  # the first request leaves at once
        now += gap
    requests = tuple(
        Request(index, offset, prompt, output, prompt_tokens)
        for index, (offset, (prompt, output, prompt_tokens)) in enumerate(zip(offsets, drawn, strict=True))
    )
    return Trace(requests, arrival, burstiness, seed, workload.name)
