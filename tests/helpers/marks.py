"""The markers of the heavy tiers (registered in pyproject.toml), for tests parametrized over engines.

A case that needs vLLM or the llama.cpp build carries that engine's marker, so `make test-quick`
(`-m "not vllm and not llama_cpp and not slow and not gpu"`) leaves it out while its hf-* siblings run.
"""

from __future__ import annotations

import pytest

ENGINE_MARKS = {"vllm": pytest.mark.vllm, "llama-cpp": pytest.mark.llama_cpp}


def engine_param(name: str, *values: object, id: str | None = None):
    """``pytest.param(name, *values)`` with the marker of the engine ``name`` names, where it has one."""
    return pytest.param(name, *values, marks=ENGINE_MARKS.get(name, ()), id=id)
