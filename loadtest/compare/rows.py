"""The comparison's rows as types: what one row of speed.csv / speed.json holds, key by key.

Rows stay dictionaries (TypedDicts), since they cross into JSON and CSV as they are: speed.json
writes each row's keys in the order the driver set them, speed.csv the columns report.CSV_FIELDS
names, and a unit test holds every one of those columns to a key declared here.  ``total=False``:
an idle row has no load figures, a failure row only the target's own fields.
"""

from __future__ import annotations

from typing import TypedDict


class SpeedRow(TypedDict, total=False):
    # The target, as the server described itself (GetModelInfo, or the outside server's setup).
    model: str
    engine: str  # the row's label: an engine, a variant, ENGINE-http or an outside server
    use_cache: bool | None
    dtype: str
    device: str
    attention: str
    model_path: str  # what the server loaded (a GGUF for llama.cpp): the roofline reads its bytes
    target_note: str  # the target's own note, folded into notes
    users: int  # 0: the idle row or a failure row
    failed: bool
    # The device over the step.
    mem_mb: float | None
    util_pct: float | None
    util_source: str  # "GPU" or "CPU"
    power_w: float | None
    power_source: str  # "NVML", "RAPL" or why there is none
    energy_j: float | None
    # The client's figures (loadtest/measure/token_stats.py's summary).
    speed_tokens_per_s: float
    requests_per_s: float
    per_user_tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p95_ms: float | None
    e2e_p50_ms: float | None
    e2e_p95_ms: float | None
    e2e_p99_ms: float | None
    requests_ok: int
    requests_cut: int
    duration_s: float
    failures_by_status: str
    errors: int
    client_tokens: int
    server_tokens: float | None
    j_per_token: float | None
    # The roofline column (loadtest/measure/roofline_column.py).
    bound_tokens_per_s: float | None
    pct_of_bound: float | None
    notes: str
    raw: str  # the raw files' prefix, relative to the report folder
    # One round's place in the run (a round row); dropped when rounds are folded into a row.
    round: int
    seq: int
    clock: str  # "locust"
    # Over the rounds (loadtest/compare/rounds.py's aggregate).
    rounds: int
    speed_min: float | None
    speed_max: float | None
    raw_rounds: list[str | None]


class ClockRow(TypedDict, total=False):
    """One step of the second clock (guidellm), as loadtest/compare/second_clock.py reads it."""

    engine: str
    users: int
    round: int
    seq: int
    clock: str  # "guidellm"
    speed_tokens_per_s: float
    output_tokens: int
    requests_ok: int
    requests_failed: int
    requests_cut: int
    requests_total: int
    ttft_p50_ms: float | None
    itl_p50_ms: float | None
    duration_s: float
    notes: str
    raw: str
