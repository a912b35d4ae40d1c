"""Whether a model fits the memory that is free, checked before it loads, and the load's progress lines.

What a model needs is its weights at the dtype it will run in (element counts from the
safetensors headers, so no tensor is read) plus the KV cache its engine reserves up front;
what is free is the RAM the kernel says is available on a CPU, or the device's free memory
on CUDA.  A model that cannot fit is refused in one line with both figures and what would
fit, instead of being killed by the kernel part-way through loading.  ``--memory-budget``
replaces what is free (tests, or a machine shared with other work); ``--skip-memory-check``
loads anyway.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import struct
import time
from pathlib import Path

from engines import model_facts
from engines.errors import ModelRefused

log = logging.getLogger(__name__)

# safetensors dtype names and their bytes per element.
_SAFETENSORS_BYTES = {
    "F64": 8,
    "I64": 8,
    "F32": 4,
    "I32": 4,
    "BF16": 2,
    "F16": 2,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
# safetensors caps its JSON header at 100 MB; anything claiming more is not one.
_MAX_HEADER = 100_000_000
# A Q4_0 GGUF holds 4.5 bits per weight (blocks of 32 four-bit values and one float16 scale).
_Q4_BYTES_PER_PARAM = 4.5 / 8
# Beyond the weights and the KV cache: activations, the allocator's slack, the runtime itself.
OVERHEAD = 1.1


def parameter_count(folder: Path) -> int | None:
    """Elements in the folder's safetensors files, read from their headers; None without any."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        try:
            with open(file, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(min(length, _MAX_HEADER)))
        except (OSError, ValueError, struct.error):
            return None  # not a safetensors file after all: the loader says what is wrong with it
        if not isinstance(header, dict):
            return None
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict) and entry.get("dtype") in _SAFETENSORS_BYTES:
                total += math.prod(entry.get("shape") or [1])
    return total


def free_bytes(device) -> tuple[int, str]:
    """Bytes free where the model will live, and what that figure is."""
    if getattr(device, "type", str(device)).startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    import psutil

    return int(psutil.virtual_memory().available), "RAM available"


def size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def ensure_fits(config, folder: Path, dtype, device, kv_bytes: int) -> int:
    """The bytes the model needs; refuses (ModelRefused) when they exceed what is free.

    ``config``: the EngineConfig, for ``memory_budget`` and ``skip_memory_check``.
    """
    params = parameter_count(folder)
    if params is None:
        log.info("memory check skipped for %s: no safetensors headers to size its weights from", folder)
        return 0
    per_value = model_facts.dtype_bytes(dtype)
    weights = params * per_value
    needed = int((weights + kv_bytes) * OVERHEAD)
    if config.memory_budget is not None:
        free, where = config.memory_budget, "the --memory-budget"
    else:
        free, where = free_bytes(device)
    if needed <= free or config.skip_memory_check:
        return needed
    name = model_facts.dtype_name(dtype)
    options = [
        f"--dtype {other} needs {size((params * width + kv_bytes * width / per_value) * OVERHEAD)}"
        for other, width in model_facts.DTYPE_BYTES.items()
        if width < per_value and other != "float16"
    ]
    options.append(f"llama-cpp with a Q4_0 GGUF needs about {size(params * _Q4_BYTES_PER_PARAM * OVERHEAD)}")
    raise ModelRefused(
        f"{folder} does not fit: it needs {size(needed)} ({size(weights)} of weights at {name}, {size(kv_bytes)} "
        f"of KV cache, {OVERHEAD:g}x for the rest) but {size(free)} is {where}; {'; '.join(options)}; "
        "--skip-memory-check loads it anyway"
    )


@contextlib.contextmanager
def loading(what: str, needed: int):
    """A start line and an end line, with the size and the seconds, around a long load."""
    log.info("loading %s (%s)...", what, size(needed) if needed else "size unknown")
    started = time.perf_counter()
    yield
    log.info("loaded %s in %.1f s", what, time.perf_counter() - started)
