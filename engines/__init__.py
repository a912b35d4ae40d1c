"""Inference engines behind one interface; see ``engines.base.Engine``."""

from engines.base import Engine, EngineConfig, EngineInfo, EngineLoad, GenerationOutput, ScoreResult
from engines.logprobs import TokenLogprob, TopLogprob
from engines.params import SamplingParams
from engines.registry import create_engine, engine_names

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineInfo",
    "EngineLoad",
    "GenerationOutput",
    "ScoreResult",
    "SamplingParams",
    "TokenLogprob",
    "TopLogprob",
    "create_engine",
    "engine_names",
]
