"""The soak benchmark (bench/soak.py) at CI size: hf-kv on tiny-llama, 300 requests."""

from __future__ import annotations

import pytest

from bench.soak import MIX, report, run_soak

pytestmark = pytest.mark.slow

# 240 requests after warm-up.  A server that kept one float32 logits row of tiny-llama's
# 49152-token vocabulary (192 KiB) per request would grow by ~45 MiB, 9 % of its ~510 MiB;
# 3 % (~15 MiB, 64 KiB a request) catches that while leaving room for the allocator's own
# drift, measured at +0.1 % over this run.  The full soak (make soak) holds 5 % over thousands.
MAX_GROWTH = 0.03


def test_soak_small(capsys):
    result = run_soak("hf-kv", "tiny-llama", requests=300, warmup=60, concurrency=4, log=lambda line: None)
    with capsys.disabled():
        print("\n" + report(result, MAX_GROWTH))
    assert result.unexpected == [], result.unexpected[:5]
    assert result.gauges_end == (0.0, 0.0)
    assert sum(result.server_by_status.values()) == result.requests
    # Every kind of outcome happened, so each expectation was really checked.
    assert {status for _, status in MIX.values()} <= set(result.by_status)
    assert result.growth < MAX_GROWTH, report(result, MAX_GROWTH)
    assert result.problems(MAX_GROWTH) == []
