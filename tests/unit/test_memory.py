"""The memory check before loading: a model's needs from its safetensors headers, against a budget."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from safetensors.numpy import save_file

from engines import memory
from engines.errors import ModelRefused


@dataclass(frozen=True)
class Config:
    memory_budget: int | None = None
    skip_memory_check: bool = False


@pytest.fixture
def folder(tmp_path):
    # 1 Mi float32 parameters in two files, stored at half width: sizes follow the dtype asked, not the file.
    save_file({"a": np.zeros((512, 1024), dtype=np.float16)}, tmp_path / "model-1.safetensors")
    save_file({"b": np.zeros((512, 1024), dtype=np.float16)}, tmp_path / "model-2.safetensors")
    return tmp_path


def test_parameters_are_counted_from_the_headers(folder):
    assert memory.parameter_count(folder) == 2**20
    assert memory.parameter_count(folder / "nothing") is None


def test_a_model_within_the_budget_loads(folder):
    needed = memory.ensure_fits(Config(memory_budget=2**30), folder, "float32", "cpu", kv_bytes=2**20)
    assert needed == int((4 * 2**20 + 2**20) * memory.OVERHEAD)


def test_a_model_over_the_budget_is_refused_with_both_numbers_and_what_would_fit(folder):
    with pytest.raises(ModelRefused) as refusal:
        memory.ensure_fits(Config(memory_budget=2**21), folder, "float32", "cpu", kv_bytes=2**20)
    message = str(refusal.value)
    assert "\n" not in message
    assert f"{folder} does not fit: it needs 5.5 MiB (4.0 MiB of weights at float32, 1.0 MiB of KV cache" in message
    assert "but 2.0 MiB is the --memory-budget" in message
    assert "--dtype bfloat16 needs 2.8 MiB" in message and "Q4_0 GGUF needs about 0.6 MiB" in message
    assert "--skip-memory-check" in message


def test_the_flag_overrides_the_check(folder):
    assert memory.ensure_fits(Config(memory_budget=1, skip_memory_check=True), folder, "float32", "cpu", 0) > 1


def test_a_file_that_is_not_safetensors_is_left_to_the_loader(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file at all")
    assert memory.parameter_count(tmp_path) is None
    assert memory.ensure_fits(Config(memory_budget=1), tmp_path, "float32", "cpu", 0) == 0
