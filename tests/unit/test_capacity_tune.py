"""Tuning: the knobs drawn from the machine's size, one capacity run of variants, the default's verdict;
and --variant in the capacity driver, which the tuning runs on."""

from __future__ import annotations

import pytest

from loadtest.capacity import report, tune
from loadtest.capacity.config import parse
from loadtest.compare.variants import parse_variant


def test_thread_counts_come_from_the_cores():
    assert tune.thread_counts(2) == ("1",)
    assert tune.thread_counts(8) == ("7", "4")
    assert tune.thread_counts(1) == ()


def test_each_value_is_a_variant_the_capacity_driver_accepts():
    tried = tune.variants("llama-cpp", 2)
    labels = [label for label, _, _ in tried]
    assert labels == ["llama-cpp-threads-1", "llama-cpp-batch-size-512"]
    argv = tune.capacity_argv({"llama-cpp": tried}, ["--step-seconds", "5", "--baseline", "llama-server"], "out")
    config = parse(argv)
    assert config.engine_names() == ["llama-cpp", *labels]
    assert [v.describe() for v in config.variant] == ["llama-cpp --threads 1", "llama-cpp --batch-size 512"]
    # The caller's flags come after the tuning's own: theirs win.
    assert config.baseline == "llama-server" and config.step_seconds == 5 and config.overload == 0


def test_hf_cb_tries_its_torch_threads_and_tokens_per_step_in_the_same_run_as_llama_cpp():
    tried = {"hf-cb": tune.variants("hf-cb", 4), "llama-cpp": tune.variants("llama-cpp", 4)}
    config = parse(tune.capacity_argv(tried, [], "out"))
    described = [v.describe() for v in config.variant]
    assert described[:4] == [
        "hf-cb --torch-threads 3",
        "hf-cb --torch-threads 2",
        "hf-cb --max-batch-tokens 256",
        "hf-cb --max-batch-tokens 4096",
    ]
    assert described[4:6] == ["llama-cpp --threads 3", "llama-cpp --threads 2"]
    assert config.engine_names()[0] == "hf-cb" and "llama-cpp" in config.engine_names()


def test_an_engine_without_knobs_is_refused_in_one_line():
    with pytest.raises(SystemExit, match="no knobs for engine 'vllm'.*vllm-openai-matched"):
        tune.variants("vllm", 2)


def test_the_default_stands_unless_a_value_beats_it_past_the_bracket():
    tried = tune.variants("llama-cpp", 2)
    within = {"llama-cpp": 1.0, "llama-cpp-threads-1": 1.15, "llama-cpp-batch-size-512": 1.0}
    lines = tune.verdict("llama-cpp", tried, within, 0.2, 2)
    assert "| --threads | 1 | 1.15 | 1.15 |" in lines
    assert "| --batch-size | 512 | 1 | 1.00 |" in lines
    assert lines[-2].startswith("The defaults stand")
    past = {**within, "llama-cpp-batch-size-512": 1.5}
    assert tune.verdict("llama-cpp", tried, past, 0.2, 2)[-2] == (
        "Better than the default: `--batch-size 512` (llama-cpp-batch-size-512), 1.50x its capacity."
    )
    lines = tune.verdict("llama-cpp", tried, {"llama-cpp-threads-1": 1.0}, 0.2, 2)
    assert "| --threads | 1 | 1 | n/a |" in lines and lines[-2].startswith("The default met the target at no rate")


def test_a_variant_is_set_beside_its_own_engine_in_the_ratio_table():
    capacities = [
        {"target": "llama-cpp", "capacity_rps": 2.0, "j_per_request": 4.0},
        {"target": "llama-cpp-t1", "capacity_rps": 1.0, "j_per_request": 6.0},
        {"target": "llama-server", "capacity_rps": 2.0, "j_per_request": 4.0},
    ]
    ratios = report.ratio_table(capacities, [parse_variant("llama-cpp-t1=llama-cpp --threads 1")])
    pairs = {(r["ours"], r["peer"]): (r["ratio"], r["energy_ratio"]) for r in ratios}
    assert pairs == {("llama-cpp", "llama-server"): (1.0, 1.0), ("llama-cpp-t1", "llama-cpp"): (0.5, 1.5)}


def test_capacity_refuses_an_unknown_name_and_a_flag_its_engine_does_not_take(capsys):
    with pytest.raises(SystemExit):
        parse(["--engines", "llama-cpp,fast"])
    assert "'fast' is neither an engine" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--engines", "t1", "--variant", "t1=llama-cpp --torch-threads 1"])
    assert "--torch-threads is not an option of engine llama-cpp" in capsys.readouterr().err
