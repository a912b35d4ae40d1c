"""A model over its memory budget is refused before it loads, in one line with both numbers; the override
flag loads it anyway, and the load says its size and its seconds."""

from __future__ import annotations

import re

import pytest

from tests.helpers.servers import run_cli


@pytest.mark.parametrize("engine", ["hf-kv", "hf-cb"])
def test_a_model_over_its_budget_is_refused_before_loading(engine):
    done = run_cli("--engine", engine, "--model", "tiny-llama", "--memory-budget", "100000", timeout=300)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"yayi-serve: error: \S+tiny-llama\S* does not fit: it needs [\d.]+ MiB \([\d.]+ MiB of weights at float32, "
        r"[\d.]+ MiB of KV cache, 1.1x for the rest\) but 0.1 MiB is the --memory-budget; --dtype bfloat16 needs "
        r"[\d.]+ MiB; llama-cpp with a Q4_0 GGUF needs about [\d.]+ MiB; --skip-memory-check loads it anyway",
        last,
    ), last
    assert "loading " not in done.stderr, "refused before the weights are read"


def test_the_override_loads_it_and_the_load_shows_its_size_and_seconds():
    from loadtest.launch.server_process import ServerProcess

    server = ServerProcess(
        "--engine", "hf-kv", "--model", "tiny-llama", "--memory-budget", "100000", "--skip-memory-check"
    ).wait_ready(240)
    try:
        assert server.generate("Hello", max_new_tokens=2).usage.completion_tokens == 2
        assert any(re.search(r"loading tiny-llama\S* at float32 on cpu \([\d.]+ MiB\)", line) for line in server.lines)
        assert any(re.search(r"loaded tiny-llama\S* at float32 on cpu in [\d.]+ s", line) for line in server.lines)
    finally:
        server.stop()
