"""The servers the comparison drivers measure, each behind the same small interface (``Target``).

One module per server: ``ours`` (our server, one engine through one front end, read through its
/metrics), and the outside OpenAI-compatible servers read through their process tree as our CPU
probe reads ours: ``vllm_openai`` (vLLM's own, as its users start it and with our engine's thread
binding), ``transformers_serve`` (``transformers serve --continuous-batching``, matched and left to
its defaults) and ``llama_server`` (llama.cpp's own).  ``base`` holds what they share,
``baselines`` which outside servers a run loads and how each is built.  The names below are the
ones the drivers and tests import.
"""

from loadtest.compare.targets.base import OutsideServerTarget, ProcessWatch, Reading, Target, TargetConfig, Watch
from loadtest.compare.targets.baselines import (
    BASELINE_ALIASES,
    BASELINE_PEER,
    BASELINES,
    baseline_target,
    chosen_baselines,
    parse_baselines,
)
from loadtest.compare.targets.llama_server import LlamaServerDefaultsTarget, LlamaServerTarget, LlamaSetup, llama_setup
from loadtest.compare.targets.ours import HTTP_SUFFIX, MetricsWatch, YayiTarget
from loadtest.compare.targets.transformers_serve import (
    MEMORY_RESERVE_BYTES,
    MEMORY_RESERVE_SHARE,
    TRANSFORMERS_DEFAULT_MEMORY_SHARE,
    TransformersServeDefaultsTarget,
    TransformersServeTarget,
    default_cache_share,
)
from loadtest.compare.targets.vllm_openai import (
    VLLMServerMatchedTarget,
    VLLMServerTarget,
    max_model_len,
    vllm_engine_args,
)

__all__ = [
    "BASELINES",
    "BASELINE_ALIASES",
    "BASELINE_PEER",
    "HTTP_SUFFIX",
    "MEMORY_RESERVE_BYTES",
    "MEMORY_RESERVE_SHARE",
    "TRANSFORMERS_DEFAULT_MEMORY_SHARE",
    "LlamaServerDefaultsTarget",
    "LlamaServerTarget",
    "LlamaSetup",
    "MetricsWatch",
    "OutsideServerTarget",
    "ProcessWatch",
    "Reading",
    "Target",
    "TargetConfig",
    "TransformersServeDefaultsTarget",
    "TransformersServeTarget",
    "VLLMServerMatchedTarget",
    "VLLMServerTarget",
    "Watch",
    "YayiTarget",
    "baseline_target",
    "chosen_baselines",
    "default_cache_share",
    "llama_setup",
    "max_model_len",
    "parse_baselines",
    "vllm_engine_args",
]
