"""The capacity report: per target and rate, the capacity table with its spread and verdict, the
ratio ours / peer, past capacity, the two clocks, the plots, and the files beside them."""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path

from loadtest.compare.targets import BASELINE_PEER, HTTP_SUFFIX
from loadtest.measure import scrape
from loadtest.measure.plots import line_plot, pyplot

# Histograms of the server's own TTFT, ours and vLLM's server's: the second clock on every step.
SERVER_TTFT = ("yayi_time_to_first_token_seconds", "vllm:time_to_first_token_seconds")

STEP_COLUMNS = [
    "target",
    "phase",
    "round",
    "offered_rps",
    "sent_rps",
    "achieved_rps",
    "output_tps",
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "server_ttft_p50_s",
    "server_ttft_p99_s",
    "tpot_p50_s",
    "tpot_p90_s",
    "tpot_p99_s",
    "itl_p50_s",
    "itl_p90_s",
    "itl_p99_s",
    "e2e_p50_s",
    "e2e_p90_s",
    "e2e_p99_s",
    "goodput_rps",
    "good_pct",
    "requests",
    "refused",
    "errors",
    "timeouts",
    "mem_mb",
    "cpu_pct",
    "power_w",
    "j_per_request",
    "j_per_token",
    "lag_p99_s",
    "valid",
    "meets",
    "why",
]


def reading_fields(reading, row: dict, duration_s: float) -> dict:
    """Memory, utilisation, power and energy of one step; None (n/a) where nothing could be read."""
    energy = reading.energy_j
    if energy is None and reading.power_mean_w is not None:
        energy = reading.power_mean_w * duration_s
    ok = row.get("ok") or 0
    tokens = row.get("output_tps", 0) * duration_s
    return {
        "mem_mb": reading.memory_peak_bytes / 2**20 if reading.memory_peak_bytes is not None else None,
        "cpu_pct": reading.utilization_mean * 100 if reading.utilization_mean is not None else None,
        "power_w": reading.power_mean_w,
        "energy_j": energy,
        "j_per_request": energy / ok if energy is not None and ok else None,
        "j_per_token": energy / tokens if energy is not None and tokens else None,
    }


def histogram_quantile(before: scrape.Samples, after: scrape.Samples, name: str, q: float) -> float | None:
    """The q-quantile (0-1) of a Prometheus histogram's observations between two scrapes, linear within
    a bucket as Prometheus' histogram_quantile is; None when the histogram is absent or saw nothing."""
    buckets: dict[float, float] = {}
    for (metric, labels), value in after.items():
        if metric != f"{name}_bucket":
            continue
        le = float(dict(labels)["le"])
        buckets[le] = buckets.get(le, 0.0) + value - before.get((metric, labels), 0.0)
    if not buckets:
        return None
    bounds = sorted(buckets)
    count = buckets[bounds[-1]]
    if count <= 0:
        return None
    rank, lower, below = q * count, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return lower  # past the last finite bucket: its bound is all that is known
            inside = buckets[bound] - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, buckets[bound]
    return None


def server_ttft(prefix: Path) -> dict:
    """The server's own TTFT percentiles over the step, from the /metrics kept before and after it."""
    try:
        before = scrape.parse(Path(f"{prefix}_metrics_before.txt").read_text())
        after = scrape.parse(Path(f"{prefix}_metrics_after.txt").read_text())
    except OSError:
        return {"server_ttft_p50_s": None, "server_ttft_p99_s": None}
    for name in SERVER_TTFT:
        p50 = histogram_quantile(before, after, name, 0.5)
        if p50 is not None:
            return {"server_ttft_p50_s": p50, "server_ttft_p99_s": histogram_quantile(before, after, name, 0.99)}
    return {"server_ttft_p50_s": None, "server_ttft_p99_s": None}


def capacity_of(rows: list[dict]) -> tuple[float | None, list[float]]:
    """A target's capacity (the highest rate meeting the target, by the majority of rounds, below the
    lowest rate that failed) and the same per round: the spread."""
    search = [r for r in rows if r.get("phase") == "search" and r.get("valid")]
    rounds = sorted({r["round"] for r in search})

    def highest(chosen: list[dict], passed) -> float | None:
        by_rate: dict[float, list[dict]] = {}
        for row in chosen:
            by_rate.setdefault(row["offered_rps"], []).append(row)
        failed = [rate for rate, group in by_rate.items() if not passed(group)]
        ok = [rate for rate, group in by_rate.items() if passed(group) and rate < min(failed, default=math.inf)]
        return max(ok, default=None)

    overall = highest(search, lambda group: 2 * sum(bool(r["meets"]) for r in group) > len(group))
    per_round = [highest([r for r in search if r["round"] == n], lambda g: all(r["meets"] for r in g)) for n in rounds]
    return overall, [c for c in per_round if c is not None]


def at_rate(rows: list[dict], rate: float, phase: str, key: str) -> float | None:
    values = [
        r[key] for r in rows if r.get("phase") == phase and r.get("offered_rps") == rate and r.get(key) is not None
    ]
    return statistics.median(values) if values else None


def capacity_table(runs) -> list[dict]:
    table = []
    for run in runs:
        if run.bound_of:
            continue
        capacity, spread = capacity_of(run.rows)
        note = run.failed or (run.search.stopped if run.search else "")
        # What makes a variant's server differ from its engine's ("variant: llama-cpp --threads 1").
        note = "; ".join(filter(None, [getattr(run.target, "note", ""), note]))
        if not run.ignore_eos:
            note = "; ".join(filter(None, [note, "cannot ignore EOS: answers may end early"]))
        if capacity is None and not note:
            note = "no rate tried met the target"
        if capacity is not None and run.search and run.search.failed is None:
            note = "; ".join(filter(None, [note, "met the target at the highest rate tried (--max-rate)"]))
        table.append(
            {
                "target": run.label,
                "capacity_rps": capacity,
                "spread": f"{min(spread):.3g}-{max(spread):.3g}" if len(spread) > 1 else "",
                "goodput_rps": at_rate(run.rows, capacity, "search", "goodput_rps") if capacity else None,
                "output_tps": at_rate(run.rows, capacity, "search", "output_tps") if capacity else None,
                "ttft_p99_s": at_rate(run.rows, capacity, "search", "ttft_p99_s") if capacity else None,
                "tpot_p99_s": at_rate(run.rows, capacity, "search", "tpot_p99_s") if capacity else None,
                "j_per_request": at_rate(run.rows, capacity, "search", "j_per_request") if capacity else None,
                "mem_mb": at_rate(run.rows, capacity, "search", "mem_mb") if capacity else None,
                "note": note,
            }
        )
    return table


def ratio_table(capacities: list[dict], variants=()) -> list[dict]:
    """Capacity ours / peer: each outside server beside each of our rows of its peer engine, and each
    variant beside its own engine (the variant's flags then the only difference)."""
    by_label = {row["target"]: row for row in capacities}
    pairs = [(ours, peer) for peer, engine in BASELINE_PEER.items() for ours in (engine, engine + HTTP_SUFFIX)]
    pairs += [(variant.label + suffix, variant.engine + suffix) for variant in variants for suffix in ("", HTTP_SUFFIX)]
    rows = []
    for ours, peer in pairs:
        if ours not in by_label or peer not in by_label:
            continue
        a, b = by_label[ours]["capacity_rps"], by_label[peer]["capacity_rps"]
        rows.append(
            {
                "ours": ours,
                "peer": peer,
                "ours_rps": a,
                "peer_rps": b,
                "ratio": a / b if a and b else None,
                "energy_ratio": _ratio(by_label[ours]["j_per_request"], by_label[peer]["j_per_request"]),
            }
        )
    return rows


def _ratio(a, b):
    return a / b if a is not None and b else None


def verdict(capacities: list[dict], ratios: list[dict], slo_text: str) -> str:
    measured = [row for row in capacities if row["capacity_rps"]]
    if not measured:
        return f"At this target ({slo_text}), on this machine, no target met it at any rate tried."
    best = max(measured, key=lambda row: row["capacity_rps"])
    text = (
        f"At this target ({slo_text}), on this machine, {best['target']} takes the most requests: "
        f"{best['capacity_rps']:.3g}/s"
    )
    others = [row for row in measured if row is not best]
    if others:
        runner = max(others, key=lambda row: row["capacity_rps"])
        energy = _ratio(best["j_per_request"], runner["j_per_request"])
        text += f", {best['capacity_rps'] / runner['capacity_rps']:.2g}x {runner['target']}'s"
        text += f" at {energy:.2g}x the energy per request" if energy is not None else " (energy n/a)"
    missing = [row["target"] for row in capacities if not row["capacity_rps"]]
    if missing:
        text += f"; {', '.join(missing)} met it at no rate tried"
    return text + "."


def overload_table(runs, capacities: dict[str, float]) -> list[dict]:
    rows = []
    for run in runs:
        for row in run.rows:
            if row.get("phase") != "overload":
                continue
            capacity = capacities.get(run.bound_of or run.label)
            rows.append(
                {
                    "target": run.label,
                    "round": row["round"],
                    "capacity_rps": capacity,
                    "offered_rps": row.get("offered_rps"),
                    "goodput_rps": row.get("goodput_rps"),
                    "goodput_share": _ratio(row.get("goodput_rps"), capacity),
                    "good_pct": row.get("good_pct"),
                    "ttft_p99_s": row.get("ttft_p99_s"),
                    "refused": row.get("refused"),
                    "errors": row.get("errors"),
                    "mem_mb": row.get("mem_mb"),
                    "health_after": row.get("health_after"),
                    "valid": row.get("valid"),
                    "error": row.get("error", ""),
                }
            )
    return rows


# ---- the folder ---------------------------------------------------------------------------------


def write(folder, config, terms, built, runs, clock_rows: list[dict]) -> None:
    from loadtest.capacity.second_clock import CLOCK_AGREEMENT
    from loadtest.capacity.sweep import describe_slo

    slo_text = describe_slo(terms)
    folder.text(
        f"Target: {slo_text}.  Trace: {len(built.requests)} requests, {built.arrival} arrivals"
        + (f" (burstiness {built.burstiness:g})" if built.arrival == "gamma" else "")
        + f", seed {built.seed}, workload {built.workload} (`trace.jsonl`); every target replays it, the first "
        "requests of it at each rate.  Settings: "
        + ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config))
    )
    capacities = capacity_table(runs)
    ratios = ratio_table(capacities, config.variant)
    folder.text("**Verdict.** " + verdict(capacities, ratios, slo_text))
    folder.table(
        "capacity",
        capacities,
        title="Capacity: the highest rate meeting the target",
        note="Spread: the capacity of each round, where --repeat gave more than one.  Figures at the capacity rate.",
    )
    if ratios:
        folder.table("ratios", ratios, title="Capacity ours / peer")
    steps = [row for run in runs for row in run.rows]
    folder.table(
        "steps",
        steps,
        columns=STEP_COLUMNS,
        title="Every step",
        note="Seconds throughout.  A step with valid=False had the client fall behind (lag p99 over --max-lag): "
        "its figures are the client's, not the server's, and no capacity is read from it.  server_ttft: the "
        "server's own histogram over the step (n/a for peers without one).  cpu_pct: the server's process tree, "
        "power and J/request n/a where the machine has no reading.",
    )
    by_label = {row["target"]: row["capacity_rps"] for row in capacities if row["capacity_rps"]}
    overload = overload_table(runs, by_label)
    if overload:
        folder.table(
            "overload",
            overload,
            title=f"Past capacity: {config.overload:g}x each target's capacity",
            note="Rows ending +wait are our engine again with yayi-serve --max-queue-wait: requests that would wait "
            "past it are refused at once (RESOURCE_EXHAUSTED / 429), so those accepted can meet the target.",
        )
    if clock_rows:
        folder.table(
            "second_clock",
            clock_rows,
            title="Second clock: vllm bench serve at each capacity point",
            note="The same prompts at the same rate and burstiness, its arrival instants its own draw.  Each "
            "clock's goodput is the share of its requests that met every term times the offered rate; they agree "
            f"when within {CLOCK_AGREEMENT:.0%}.  Each tool's goodput over its own run (its span moves with the "
            "arrival draw) is beside them.",
        )
    _plots(folder, [r for r in steps if r.get("valid") and r.get("phase") == "search"], terms)


def _plots(folder, rows: list[dict], terms) -> None:
    if not rows:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("ttft", "tpot"), strict=True):
        line_plot(
            ax,
            rows,
            "offered_rps",
            f"{metric}_p99_s",
            "target",
            xlabel="offered req/s",
            ylabel=f"P99 {metric.upper()} (s)",
        )
        for term in terms:
            if term.metric == metric:
                ax.axhline(term.bound_s, color="red", linestyle="--", linewidth=1)
    folder.figure("latency", fig, "P99 TTFT and TPOT against the offered rate; dashed: the target")
    fig, ax = plt.subplots(figsize=(6, 4))
    line_plot(ax, rows, "offered_rps", "goodput_rps", "target", xlabel="offered req/s", ylabel="goodput req/s")
    folder.figure("goodput", fig, "Goodput (requests meeting every term, per second) against the offered rate")
    pareto = []
    for row in rows:
        if row.get("tpot_p50_s"):
            pareto.append({**row, "tps_per_user": 1 / row["tpot_p50_s"]})
    fig, ax = plt.subplots(figsize=(6, 4))
    line_plot(
        ax,
        pareto,
        "output_tps",
        "tps_per_user",
        "target",
        xlabel="output tokens/s (machine)",
        ylabel="tokens/s per user (1 / TPOT p50)",
    )
    folder.figure("pareto", fig, "Tokens/s per user against tokens/s of the machine, one point per rate")
