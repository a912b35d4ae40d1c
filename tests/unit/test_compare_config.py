"""The drivers' typed command lines (engines/option_flags.py) and the comparison's typed rows."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from engines.option_flags import flag_option, is_flag, parse_config
from loadtest.compare.config import CompareConfig, parse_args
from loadtest.compare.report import CSV_FIELDS
from loadtest.compare.rows import SpeedRow
from loadtest.compare.vllm_bench import VllmBenchConfig
from loadtest.compare.vllm_bench import parse_args as vllm_bench_args
from loadtest.evaluation.driver import EvalConfig
from loadtest.evaluation.driver import parse_args as eval_args


def test_the_compare_config_is_built_once_and_cannot_be_changed():
    config = parse_args(["--users", "1,8", "--apis", "grpc,http", "--duration", "2m", "--engines", "hf-kv"])
    assert (config.users, config.apis, config.duration, config.engine_names) == (
        (1, 8),
        ("grpc", "http"),
        120.0,
        ["hf-kv"],
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.users = (2,)  # type: ignore[misc]
    later = dataclasses.replace(config, model_path="/models/m")
    assert later.model_path == "/models/m" and config.model_path == ""


def test_every_flag_default_is_the_fields_own():
    """No flags given: the config equals the dataclass's defaults, so a default lives in one place."""
    assert parse_args([]) == CompareConfig()
    assert eval_args([]) == EvalConfig()
    assert vllm_bench_args([]) == VllmBenchConfig()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--users", "0"], "--users needs at least one concurrency"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--kv-cache-gb", "-1"], "--kv-cache-gb must be positive"),
        (["--together", "some"], "invalid choice: 'some'"),
        (["--engines", "nope"], "nope"),
    ],
)
def test_a_refused_flag_exits_with_its_reason(capsys, argv, says):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err


def test_a_field_without_help_is_no_flag():
    @dataclasses.dataclass(frozen=True)
    class Tool:
        steps: tuple[int, ...] = flag_option((1,), "steps", parse=lambda text: tuple(map(int, text.split(","))))
        names: tuple[str, ...] = flag_option((), "a name, repeatable", repeat=True)
        derived: str = ""

    assert [f.name for f in dataclasses.fields(Tool) if is_flag(f)] == ["steps", "names"]
    tool = parse_config(Tool, ["--steps", "2,3", "--names", "a", "--names", "b"], prog="tool", description="")
    assert tool == Tool(steps=(2, 3), names=("a", "b"))
    with pytest.raises(SystemExit):
        parse_config(Tool, ["--derived", "x"], prog="tool", description="")


def test_every_csv_column_is_a_declared_row_key():
    keys = typing.get_type_hints(SpeedRow)
    assert [column for column in CSV_FIELDS if column not in keys] == []
