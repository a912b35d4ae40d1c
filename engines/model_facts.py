"""What a model's config and a dtype say about sizes, read in one place.

The engines size their context and KV cache from these, and the load tests (the roofline
model, the outside servers set up as our engines are) read the same rules here, so a
figure in a report and the engine it measures cannot drift apart.  Free of torch and
transformers: a config is anything with the attributes of a transformers config, or,
for the context, its ``config.json`` as a dict.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The context served for a config that names none.
DEFAULT_CONTEXT = 2048
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# A dtype name outside DTYPE_BYTES is sized as the widest of them, so a size check errs on the safe side.
_UNKNOWN_DTYPE_BYTES = 4


def context_length(config: Any, fields: tuple[str, ...] = ("max_position_embeddings",)) -> int:
    """The model's context in tokens: the first of ``fields`` the config sets (not 0 or None), else
    DEFAULT_CONTEXT.  ``config`` is a transformers config or a ``config.json`` dict."""
    for name in fields:
        value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
        if value:
            return int(value)
    return DEFAULT_CONTEXT


def dtype_name(dtype: object) -> str:
    """``torch.bfloat16`` or ``"bfloat16"`` as the name the command line and the reports use: ``bfloat16``."""
    return str(dtype).removeprefix("torch.")


def dtype_bytes(dtype: object) -> int:
    """Bytes of one value of ``dtype`` (a torch dtype or its name)."""
    return DTYPE_BYTES.get(dtype_name(dtype), _UNKNOWN_DTYPE_BYTES)


def kv_bytes_per_token(config: Any, dtype: object) -> int:
    """Keys and values of one token in every layer, held at ``dtype``.

    Grouped-query models say their KV heads (``num_key_value_heads``); others have one per
    attention head.  The head size is ``head_dim`` where the config gives it, else the hidden
    size split over the heads.
    """
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes(dtype)


def generation_eos_ids(folder: Path) -> frozenset[int]:
    """The end-of-sequence ids a model folder's generation_config.json names (one id or a list); none without it."""
    try:
        settings = json.loads((Path(folder) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return frozenset()
    ids = settings.get("eos_token_id") if isinstance(settings, dict) else None
    ids = [ids] if isinstance(ids, int) else ids if isinstance(ids, list) else []
    return frozenset(int(i) for i in ids if isinstance(i, int) and not isinstance(i, bool))
