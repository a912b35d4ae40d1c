"""Which outside servers a run loads, and each one built as its peer engine is set up."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from loadtest.compare.targets.base import OutsideServerTarget, TargetConfig
from loadtest.compare.targets.llama_server import LlamaServerDefaultsTarget, LlamaServerTarget
from loadtest.compare.targets.transformers_serve import TransformersServeDefaultsTarget, TransformersServeTarget
from loadtest.compare.targets.vllm_openai import VLLMServerMatchedTarget, VLLMServerTarget, max_model_len

BASELINES = (
    "vllm-openai",
    "vllm-openai-matched",
    "transformers-serve-matched",
    "transformers-serve-defaults",
    "llama-server",
    "llama-server-defaults",
)
# The engine each outside baseline stands beside: it runs under "auto" when that engine does.
BASELINE_PEER = {
    "vllm-openai": "vllm",
    "vllm-openai-matched": "vllm",
    "transformers-serve-matched": "hf-cb",
    "transformers-serve-defaults": "hf-cb",
    "llama-server": "llama-cpp",
    "llama-server-defaults": "llama-cpp",
}
# Older names still taken by --baseline.
BASELINE_ALIASES = {"transformers-serve": "transformers-serve-matched"}


def parse_baselines(text: str) -> list[str] | str:
    """``auto``, ``none``, or outside servers by name separated by commas."""
    import argparse

    text = text.strip()
    if text in ("auto", "none"):
        return text
    names = [BASELINE_ALIASES.get(part.strip(), part.strip()) for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in BASELINES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"--baseline takes auto, none, or any of {', '.join(BASELINES)} separated by commas, got {text!r}"
        )
    return names


def chosen_baselines(choice: Sequence[str] | str, engines: Sequence[str]) -> list[str]:
    """``auto``: each baseline whose peer engine is measured and whose software is installed."""
    if choice == "none":
        return []
    if choice != "auto":
        return [choice] if isinstance(choice, str) else list(choice)
    import importlib.util

    from engines.llama_cpp.gguf import llama_cpp_home

    installed = {
        "vllm-openai": importlib.util.find_spec("vllm") is not None,
        "vllm-openai-matched": importlib.util.find_spec("vllm") is not None,
        "llama-server": os.access(llama_cpp_home() / "bin" / "llama-server", os.X_OK),
    }
    installed["llama-server-defaults"] = installed["llama-server"]
    return [name for name in BASELINES if BASELINE_PEER[name] in engines and installed.get(name, True)]


def baseline_target(name: str, config: TargetConfig, raw: Path) -> OutsideServerTarget:
    """An outside server set up as its peer engine is: the same dtype, KV cache and context."""
    log_path = raw / f"{name}_server.log"
    if name in ("vllm-openai", "vllm-openai-matched"):
        kind = VLLMServerMatchedTarget if name == "vllm-openai-matched" else VLLMServerTarget
        return kind(
            config.model_path,
            config.model,
            config.vllm_dtype,
            log_path,
            config.sample_period,
            kv_cache_gb=config.kv_cache_gb,
            max_model_len=max_model_len(config),
            extra_args=list(config.baseline_args),
        )
    if name == "llama-server":
        return LlamaServerTarget(config, log_path)
    if name == "llama-server-defaults":
        return LlamaServerDefaultsTarget(config, log_path)
    if name == "transformers-serve-defaults":
        return TransformersServeDefaultsTarget(
            config.model_path,
            config.dtype,
            log_path,
            config.sample_period,
            list(config.transformers_serve_defaults_args),
        )
    return TransformersServeTarget(
        config.model_path, config.dtype, log_path, config.sample_period, list(config.transformers_serve_args)
    )
