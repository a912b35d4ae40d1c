"""`make compare`'s second outside baseline: `transformers serve --continuous-batching`, a real
server on a real port, loaded by the same Locust user as vLLM's own server."""

import json
import subprocess
import sys

from engines.hf_cb import default_cache_plan
from loadtest.server_process import ROOT

MAX_NEW_TOKENS = 32


def test_transformers_serve_baseline_is_measured_the_same_way(tmp_path):
    out = tmp_path / "baseline"
    command = [
        sys.executable,
        "-m",
        "loadtest.compare",
        "--engines",
        "",
        "--baseline",
        "transformers-serve",
        "--model",
        "tiny-llama",
        "--users",
        "2",
        "--duration",
        "4s",
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--idle-seconds",
        "1",
        "--stop-timeout",
        "30",
        "--probe-seconds",
        "0",
        "--out",
        str(out),
    ]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((out / "speed.json").read_text())
    rows = report["rows"]
    assert [(r["engine"], r["users"]) for r in rows] == [("transformers-serve", 0), ("transformers-serve", 2)]
    loaded = rows[1]
    # No request refused: the load sent no ignore_eos, which transformers serve answers with 422.
    assert loaded["errors"] == 0 and loaded["requests_ok"] > 0 and loaded["speed_tokens_per_s"] > 0
    assert loaded["requests_ok"] <= loaded["client_tokens"] <= MAX_NEW_TOKENS * loaded["requests_ok"]
    # Usage comes only with the last chunk: tokens are counted as their text arrives, or the
    # first token would be timed at the end of the request.
    assert loaded["ttft_p50_ms"] < loaded["e2e_p50_ms"] / 2
    assert loaded["attention"] == "paged (transformers' default)" and loaded["dtype"] == "float32"
    # It ran with hf-cb's KV cache, and the report says the load honoured EOS for it.
    plan = default_cache_plan("tiny-llama", "float32")
    command = (out / "raw" / "transformers-serve_server.log").read_text().splitlines()[0]
    assert " serve " in command and "--continuous-batching" in command
    assert f"--cb-num-blocks {plan.num_blocks} --cb-block-size {plan.block_size}" in command
    assert any("ending at EOS" in note for note in report["context"]["column_notes"])
