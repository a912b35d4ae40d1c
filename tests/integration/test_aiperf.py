"""AIPerf, NVIDIA's benchmark client, drives the OpenAI-compatible HTTP front end in both of its
text modes (``--endpoint-type completions`` and ``chat``, streaming), and what it exports agrees
with the server: every request succeeded, no error was recorded, and the output tokens it counted
are the tokens the server's ``yayi_generation_tokens_total`` counted.

AIPerf counts tokens from the usage each stream ends with (``--use-server-token-count``), not by
tokenizing the text it received: tiny-llama's random tokens do not survive a decode and re-encode
(greedy, 96 tokens re-encoded to 60 in completions mode and 24 in chat mode), so a count from the
text would measure the tokenizer, not the server.

AIPerf lives in its own environment, ``$VENV/aiperf`` (its pins clash with the server's, see
loadtest/compare/second_clock.py); the first run on a machine installs it there, later runs find it.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from engines.models import resolve_model
from loadtest.compare import second_clock
from loadtest.launch.server_process import ServerProcess
from tests.helpers.observe import metric
from tests.helpers.servers import served

REQUESTS = 8
CONCURRENCY = 2
OUTPUT_TOKENS = 12
# The log's speed prompts, each request's prompt in turn.
PROMPTS = (
    "Hey, are you conscious? Can you talk to me?",
    "I feel so bad today, what should I do?",
    "I've won an award today, I'm in a good mood",
)
MODES = ("completions", "chat")
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
# The first run on a machine installs AIPerf (some 40 s here, more with a cold pip cache) in the first test's setup.
pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


@pytest.fixture(scope="module")
def aiperf():
    return second_clock.install(client=second_clock.AIPERF)  # nothing is done when it is there


@pytest.fixture(scope="module")
def server():
    yield from served("--engine", "hf-cb", "--model", "tiny-llama", "--http-port", "0", "--dtype", "float32")


@pytest.fixture(scope="module")
def runs(aiperf, server, tmp_path_factory):
    """Each mode once, one after the other, with the server's counters read around each run."""
    folder = tmp_path_factory.mktemp("aiperf")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": p, "output_length": OUTPUT_TOKENS}) + "\n" for p in PROMPTS))
    return {mode: profile(aiperf, server, mode, prompts, folder / mode) for mode in MODES}


def profile(aiperf, server: ServerProcess, mode: str, prompts, artifacts) -> dict:
    before = counters(server, mode)
    command = [
        str(aiperf),
        "profile",
        "--model",
        "tiny-llama",
        "--url",
        server.http_url,
        "--endpoint-type",
        mode,
        "--streaming",
        "--tokenizer",
        str(resolve_model("tiny-llama")),
        "--input-file",
        str(prompts),
        "--custom-dataset-type",
        "single-turn",
        "--dataset-sampling-strategy",
        "sequential",
        "--request-count",
        str(REQUESTS),
        "--concurrency",
        str(CONCURRENCY),
        # greedy and exactly OUTPUT_TOKENS each, as vLLM's own benchmarks ask
        "--extra-inputs",
        '{"temperature": 0, "ignore_eos": true}',
        "--use-server-token-count",
        "--no-server-metrics",
        "--no-gpu-telemetry",
        "--ui",
        "none",
        "--artifact-dir",
        str(artifacts),
    ]
    # AIPerf 0.13 in offline mode looks a tokenizer up as a hub repo id even when it is a local
    # folder, and fails; a local folder needs no hub, so the offline switches are left out for it.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    after = counters(server, mode)
    return {
        "summary": json.loads((artifacts / "profile_export_aiperf.json").read_text()),
        "records": [json.loads(line) for line in (artifacts / "profile_export.jsonl").read_text().splitlines()],
        "server": {name: after[name] - before[name] for name in before},
    }


def counters(server: ServerProcess, mode: str) -> dict[str, float]:
    return {
        "generation_tokens": metric(server, "yayi_generation_tokens_total"),
        "ok": metric(server, "yayi_requests_total", api="http", method=PATHS[mode], status="OK"),
        "all": metric(server, "yayi_requests_total", api="http", method=PATHS[mode]),
    }


def total(summary: dict, name: str) -> float:
    return summary[name]["avg"]


@pytest.mark.parametrize("mode", MODES)
def test_every_request_succeeded_and_no_error_was_recorded(runs, mode):
    run = runs[mode]
    summary = run["summary"]
    assert summary["input_config"]["endpoint"]["type"] == mode
    assert summary["is_complete"] and not summary["was_cancelled"]
    assert summary["error_summary"] == []
    assert total(summary, "request_count") == REQUESTS
    assert total(summary, "completed_request_count") == REQUESTS
    assert total(summary, "request_error_rate") == 0
    assert summary.get("error_request_count", {"avg": 0})["avg"] == 0  # exported only when there are errors
    assert len(run["records"]) == REQUESTS
    assert all(record.get("error") is None for record in run["records"]), [r["error"] for r in run["records"]]
    assert run["server"]["ok"] == run["server"]["all"] == REQUESTS


@pytest.mark.parametrize("mode", MODES)
def test_the_output_tokens_it_counted_are_the_servers(runs, mode):
    run = runs[mode]
    summary, generated = run["summary"], run["server"]["generation_tokens"]
    assert generated == REQUESTS * OUTPUT_TOKENS
    assert total(summary, "total_osl") == generated
    assert total(summary, "total_usage_completion_tokens") == generated
    assert total(summary, "osl_mismatch_count") == 0  # each request got the output length it asked for
    per_request = [record["metrics"]["output_sequence_length"]["value"] for record in run["records"]]
    assert per_request == [OUTPUT_TOKENS] * REQUESTS
    assert total(summary, "time_to_first_token") > 0 and total(summary, "inter_token_latency") > 0
