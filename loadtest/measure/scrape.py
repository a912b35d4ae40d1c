"""Reading a server's /metrics: the one parser for load tests, benchmarks, scripts and tests.

One scrape (``read``, or ``fetch`` + ``parse`` when the text is kept too), sums over label
subsets (``total``, ``by_label``), and a sampler that scrapes on a period so a gauge's mean
and maximum over a run are known, not just its last value."""

from __future__ import annotations

import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/metrics"


def fetch(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def parse(body: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def read(port: int, timeout: float = 5.0) -> Samples:
    """One scrape of the server whose metrics listen on ``port`` (ServerProcess.metrics_port)."""
    return parse(fetch(metrics_url(port), timeout))


def total(samples: Samples, name: str, **labels: str) -> float | None:
    """Sum of a metric's series matching the labels; None when the server does not export it
    (power on a CPU without RAPL), which a report must show as n/a rather than 0."""
    wanted = set(labels.items())
    values = [value for (metric, series), value in samples.items() if metric == name and wanted <= set(series)]
    return sum(values) if values else None


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """A metric's series summed per value of one label: ``{"OK": 12, "CANCELLED": 1}`` for ``status``."""
    sums: dict[str, float] = {}
    for (metric, series), value in samples.items():
        key = dict(series).get(label)
        if metric == name and key is not None:
            sums[key] = sums.get(key, 0.0) + value
    return sums


class GaugeSampler:
    """Scrapes ``url`` every ``period`` seconds on a thread and keeps every scrape's gauges."""

    def __init__(self, url: str, names: tuple[str, ...], period: float = 1.0) -> None:
        self.url, self.names, self.period = url, names, period
        self.readings: dict[str, list[float]] = {name: [] for name in names}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GaugeSampler:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                samples = parse(fetch(self.url))
            except OSError:
                samples = {}
            for name in self.names:
                value = total(samples, name)
                if value is not None:
                    self.readings[name].append(value)
            self._stop.wait(max(0.0, self.period - (time.monotonic() - started)))

    def mean(self, name: str) -> float | None:
        values = self.readings[name]
        return sum(values) / len(values) if values else None

    def max(self, name: str) -> float | None:
        values = self.readings[name]
        return max(values) if values else None
