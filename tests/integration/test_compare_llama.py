"""yayi-compare with llama-cpp and its outside peer, llama.cpp's own llama-server, end to end: real
servers on the shipped Q4_1 GGUF of SmolLM2, real Locust, each side's tokens counted by the client
equal to the server's own counter, and the ratio table and roofline of the bytes that really run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engines.llama_cpp.gguf import llama_cpp_home
from loadtest.launch.server_process import ROOT

pytestmark = [
    pytest.mark.llama_cpp,
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.access(llama_cpp_home() / "bin" / "llama-server", os.X_OK),
        reason="llama.cpp's llama-server is built by `make llama-cpp` (make test depends on it)",
    ),
]

TOKENS = 16


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One short run: 2 users for 4 s against each side, every request exactly 16 tokens."""
    out = tmp_path_factory.mktemp("compare-llama") / "report"
    command = [
        sys.executable,
        "-m",
        "loadtest.compare.driver",
        "--engines",
        "llama-cpp",
        "--model",
        "smollm2-135m",
        "--users",
        "2",
        "--duration",
        "4s",
        "--max-new-tokens",
        str(TOKENS),
        "--idle-seconds",
        "1",
        "--stop-timeout",
        "30",
        "--probe-seconds",
        "0.4",
        "--out",
        str(out),
    ]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out, json.loads((out / "speed.json").read_text())


def loaded(data: dict, engine: str) -> dict:
    return next(r for r in data["rows"] if r["engine"] == engine and r["users"])


def test_llama_server_is_loaded_beside_llama_cpp_and_counted_by_its_own_counter(report):
    out, data = report
    assert [(r["engine"], r["users"]) for r in data["rows"]] == [
        ("llama-cpp", 0),
        ("llama-cpp", 2),
        ("llama-server", 0),
        ("llama-server", 2),
        ("llama-server-defaults", 0),
        ("llama-server-defaults", 2),
    ]
    for engine in ("llama-cpp", "llama-server", "llama-server-defaults"):
        row = loaded(data, engine)
        # No request refused or dropped (llama-server closes a streamed connection after its answer).
        assert row["errors"] == 0 and row["requests_ok"] > 0 and row["speed_tokens_per_s"] > 0, row["notes"]
        # The client's count equals the server's own: yayi_generation_tokens_total for ours,
        # llamacpp:tokens_predicted_total (llama-server --metrics) for theirs.
        assert row["client_tokens"] == row["server_tokens"] == TOKENS * row["requests_ok"], engine
        assert row["mem_mb"] > 50 and row["ttft_p50_ms"] > 0
    started = (out / "raw" / "llama-server_server.log").read_text().splitlines()[0]
    flags = started.split()
    assert flags[flags.index("--threads") + 1] == str(os.cpu_count()) and "--metrics" in flags
    assert flags[flags.index("--parallel") + 1] == "16"  # llama-cpp's own slots
    # As its users start it: the file, an address and its counter, nothing of our engine's settings.
    started = (out / "raw" / "llama-server-defaults_server.log").read_text().splitlines()[0].split()
    assert "--model" in started and "--metrics" in started
    assert not {"--threads", "--parallel", "--ctx-size", "--no-kv-unified", "--batch-size"} & set(started)


def test_both_run_the_same_q4_1_file_and_are_held_to_its_bound(report):
    out, data = report
    ours, theirs = loaded(data, "llama-cpp"), loaded(data, "llama-server")
    assert ours["dtype"] == theirs["dtype"] == "Q4_1"
    assert ours["model_path"] == theirs["model_path"] and ours["model_path"].endswith("Q4_1.gguf")
    # One file, one machine, one concurrency: one bound, from the file's bytes, not bf16's.
    assert ours["bound_tokens_per_s"] == pytest.approx(theirs["bound_tokens_per_s"])
    assert 0 < ours["pct_of_bound"] < 100 and 0 < theirs["pct_of_bound"] < 100
    text = (out / "speed.md").read_text()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf): weights are the file's own tensors" in text
    assert "## Our llama-cpp engine against llama.cpp's own llama-server" in text
    assert "| Users | tokens/s llama-cpp | tokens/s llama-server | ratio (median) |" in text
