"""Reading lm-eval's results and holding two runs of the same tasks against each other.

``agreement`` is the evaluation report's verdict: accuracy-like metrics (a mean of 0/1 per
document) must be equal, since the same documents scored the same way give the same count;
everything else (perplexities, bits per byte) within 1 %, since a server's batched or cached
forward passes round differently from one full forward pass.  ``sample_differences`` says
where two runs part, document by document, so a disagreement can be traced to the requests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# Per-document 0/1 scores averaged: equal counts give bit-identical means.
EXACT_METRICS = frozenset({"acc", "acc_norm", "acc_mutual_info", "exact_match"})
RELATIVE_TOLERANCE = 0.01


def metric_values(results: dict) -> dict[tuple[str, str, str], float]:
    """``{(task, metric, filter): value}`` from lm-eval's ``results["results"]`` (stderr and aliases left out)."""
    values = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key:
                continue
            metric, filter_name = key.split(",", 1)
            if isinstance(value, int | float) and not isinstance(value, bool):
                values[(task, metric, filter_name)] = float(value)
    return values


def rule(metric: str) -> str:
    return "equal" if metric in EXACT_METRICS else f"within {RELATIVE_TOLERANCE:.0%}"


def agrees(metric: str, a: float | None, b: float | None) -> bool:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return False
    if metric in EXACT_METRICS:
        return a == b
    if a == b:
        return True
    return abs(a - b) <= RELATIVE_TOLERANCE * max(abs(a), abs(b))


def relative_difference(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    if a == b:
        return 0.0
    scale = max(abs(a), abs(b))
    return abs(a - b) / scale if scale else None


def agreement(server: dict, in_process: dict) -> list[dict]:
    """One row per (task, metric, filter) found in either run; a metric only one side has disagrees."""
    ours, theirs = metric_values(server), metric_values(in_process)
    rows = []
    for key in sorted(ours.keys() | theirs.keys()):
        task, metric, filter_name = key
        a, b = ours.get(key), theirs.get(key)
        rows.append(
            {
                "task": task,
                "metric": metric,
                "filter": filter_name,
                "server": a,
                "in_process": b,
                "relative_difference": relative_difference(a, b),
                "rule": rule(metric),
                "agree": agrees(metric, a, b),
            }
        )
    return rows


def _flatten(value) -> Iterable:
    if isinstance(value, list | tuple):
        for item in value:
            yield from _flatten(item)
    else:
        yield value


def _numbers(value) -> list[float]:
    """The log-likelihoods in a document's raw responses (is-greedy flags left out)."""
    return [float(x) for x in _flatten(value) if isinstance(x, int | float) and not isinstance(x, bool)]


def _texts(value) -> list[str]:
    """A generation's answer; empty for log-likelihood responses."""
    return [x for x in _flatten(value) if isinstance(x, str)]


def sample_differences(server_samples: dict, in_process_samples: dict) -> list[dict]:
    """Per task: documents paired, documents whose per-document score or generated answer differs,
    and the largest log-likelihood gap (nats) between the two runs' raw responses (None for
    generation tasks)."""
    rows = []
    for task in sorted(server_samples.keys() & in_process_samples.keys()):
        theirs = {(s["doc_id"], s.get("filter")): s for s in in_process_samples[task]}
        paired, differing, gap, numeric = 0, 0, 0.0, False
        for sample in server_samples[task]:
            other = theirs.get((sample["doc_id"], sample.get("filter")))
            if other is None:
                continue
            paired += 1
            scores = [m for m in sample.get("metrics", []) if m in EXACT_METRICS]
            if _texts(sample.get("filtered_resps")) != _texts(other.get("filtered_resps")) or any(
                sample.get(m) != other.get(m) for m in scores
            ):
                differing += 1
            ours, others = _numbers(sample.get("resps")), _numbers(other.get("resps"))
            if ours or others:
                numeric = True
                gap = max(gap, max(abs(x - y) for x, y in zip(ours, others))) if len(ours) == len(others) else math.inf
        rows.append(
            {
                "task": task,
                "docs": paired,
                "docs_differing": differing,
                "max_loglikelihood_gap": gap if numeric else None,
            }
        )
    return rows
