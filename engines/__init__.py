"""Inference engines behind one interface; see ``engines.base.Engine``."""

from .base import Engine, EngineConfig, EngineInfo, EngineLoad, GenerationOutput, ScoreResult
from .logprobs import TokenLogprob, TopLogprob
from .params import SamplingParams
from .registry import create_engine, engine_names

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
