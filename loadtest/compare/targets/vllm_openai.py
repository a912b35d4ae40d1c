"""vLLM's own OpenAI-compatible server beside our vllm rows, and the settings both must share
(dtype, KV cache, context)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from loadtest.compare.targets.base import OutsideServerTarget, TargetConfig


class VLLMServerTarget(OutsideServerTarget):
    """vLLM's own server (``python -m vllm.entrypoints.openai.api_server``), beside our vllm rows."""

    label = "vllm-openai"
    name = "vllm (OpenAI server)"
    attention = "vLLM's own"
    tokens_counter = "vllm:generation_tokens_total"

    def __init__(self, *args, kv_cache_gb: float, max_model_len: int, extra_args: list[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kv_cache_gb, self.max_model_len, self.extra_args = kv_cache_gb, max_model_len, extra_args

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_path,
            "--served-model-name",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--seed",
            "0",
            *self.extra_args,
        ]

    def env(self) -> dict[str, str]:
        return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": f"{self.kv_cache_gb:g}"}


class VLLMServerMatchedTarget(VLLMServerTarget):
    """vLLM's own server with our vllm engine's CPU thread binding (engines/vllm/layout.py): its worker on
    every core, where its own "auto" keeps one back for its scheduler.  Beside ``VLLMServerTarget`` (as its
    users start it), it shows whether a lead comes from the binding or from the rest of the engine."""

    label = "vllm-openai-matched"
    name = "vllm (OpenAI server), our engine's thread binding"

    def env(self) -> dict[str, str]:
        from engines.vllm.layout import BIND_ENV, Layout, binding_for

        binding = binding_for(Layout(), "cpu")
        return {**super().env(), **({BIND_ENV: binding} if binding else {})}


def max_model_len(config: TargetConfig) -> int:
    """The context both vLLM servers serve: the configured one, else the model's by our vllm engine's rule."""
    if config.max_model_len:
        return config.max_model_len
    import json

    from engines.model_facts import context_length
    from engines.vllm.engine import VLLMOptions

    model = json.loads((Path(config.model_path) / "config.json").read_text())
    return VLLMOptions().max_model_len_for(context_length(model))


def vllm_engine_args(config: TargetConfig) -> list[str]:
    """Our vllm engine's flags that must match vLLM's own server's (dtype, KV cache, context)."""
    return [
        "--dtype",
        config.vllm_dtype,
        "--kv-cache-gb",
        f"{config.kv_cache_gb:g}",
        "--max-model-len",
        str(max_model_len(config)),
    ]
