"""Protobuf at the edge: wire messages to engine types and back. Engines never see protobuf."""

from __future__ import annotations

from engines.base import EngineInfo, ScoreResult
from engines.params import DEFAULT_MAX_NEW_TOKENS, SamplingParams

from .wire import pb


def sampling_params(message: pb.SamplingParams) -> SamplingParams:
    """Unset optional fields take defaults; set ones are validated by SamplingParams itself."""

    def given(name: str, default):
        return getattr(message, name) if message.HasField(name) else default

    return SamplingParams(
        max_new_tokens=given("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
        temperature=given("temperature", 0.0),
        top_p=given("top_p", 1.0),
        top_k=given("top_k", 0),
        repetition_penalty=given("repetition_penalty", 1.0),
        stop=tuple(message.stop),
        seed=given("seed", None),
        ignore_eos=message.ignore_eos,
    )


def model_info(info: EngineInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        engine=info.engine,
        model=info.model,
        dtype=info.dtype,
        device=info.device,
        attention=info.attention,
        use_cache=info.use_cache,
        max_context=info.max_context,
        vocab_size=info.vocab_size,
        max_concurrent_requests=info.max_concurrent_requests,
        max_queue=info.max_queue,
        model_path=info.model_path,
        kv_cache_tokens=info.kv_cache_tokens,
        kv_cache_bytes=info.kv_cache_bytes,
    )


def score_response(result: ScoreResult) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        total_logprob=result.total_logprob, token_count=result.token_count, perplexity=result.perplexity
    )
