"""The offline experiments' arithmetic without running them: growth exponents and step slopes, one
attention cell measured on small tensors (and a NaN failing it), the markdown table."""

from __future__ import annotations

import math

import pytest
import torch

from bench import attention_kernels, cache_vs_length
from loadtest.measure.tables import markdown_table


def test_attention_backward_and_nan_fails(tmp_path, monkeypatch):
    cell = attention_kernels.Cell(1, 2, 32, 16, "float32")
    row = attention_kernels.measure("sdpa-math", cell, torch.device("cpu"), 1, 1, True, {})
    assert row["status"] == "ok" and row["pass"] == "fwd+bwd"
    assert row["tflops"] == pytest.approx(attention_kernels.attention_flops(1, 2, 32, 16, True) / row["time_ms"] / 1e9)
    monkeypatch.setattr(attention_kernels, "make_call", lambda impl: lambda q, k, v: torch.full_like(q, math.nan))
    assert attention_kernels.measure("eager", cell, torch.device("cpu"), 1, 1, False, {})["status"].startswith("FAIL")


def test_growth_exponent():
    lengths = [32, 64, 128, 256, 512]
    assert cache_vs_length.growth_exponent(lengths, [n * n * 1e-5 for n in lengths]) == pytest.approx(2.0)
    assert cache_vs_length.growth_exponent(lengths, [n * 1e-3 for n in lengths]) == pytest.approx(1.0)
    # 2 ms more per step per token of length, and a burst of other work that must not tilt it
    steps = [1.0] + [0.1 + 0.002 * i for i in range(100)]
    steps[90] = 5.0
    assert cache_vs_length.step_slope_ms(steps) == pytest.approx(2.0, rel=0.05)
    assert cache_vs_length.step_slope_ms([1.0] + [0.05] * 100) == 0


def test_markdown_table_formats():
    table = markdown_table([{"a": "x", "b": 1234.5, "c": 0.000123, "d": None}])
    assert table.splitlines()[1] == "| --- | ---: | ---: | --- |"  # numbers right-aligned
    assert table.splitlines()[2] == "| x | 1234 | 1.23e-04 |  |"
    # a pipe inside a cell stays inside it
    assert markdown_table([{"why": "a | b"}]).splitlines()[2] == "| a \\| b |"
