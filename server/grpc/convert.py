"""Protobuf at the edge: wire messages to engine types and back. Engines never see protobuf."""

from __future__ import annotations

from engines.base import EngineInfo, ScoreResult
from engines.params import SamplingParams
from server.grpc.wire import pb

# The `optional` fields of the wire's SamplingParams: absent means "the default".
OPTIONAL_FIELDS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "logprobs",
    "prompt_logprobs",
)


def sampling_params(message: pb.SamplingParams) -> SamplingParams:
    """Unset optional fields take SamplingParams' own defaults, as the HTTP front end's absent fields do;
    set ones are validated by SamplingParams itself."""
    given = {name: getattr(message, name) for name in OPTIONAL_FIELDS if message.HasField(name)}
    return SamplingParams(
        **given, stop=tuple(message.stop), ignore_eos=message.ignore_eos, stop_token_ids=tuple(message.stop_token_ids)
    )


def token_logprobs(entries) -> list[pb.TokenLogprob]:
    """Engine entries as wire messages; the first prompt token's (None) keeps only its place."""
    messages = []
    for entry in entries:
        if entry is None:
            messages.append(pb.TokenLogprob())
            continue
        top = [pb.TopLogprob(token_id=alt.token_id, text=alt.text, logprob=alt.logprob) for alt in entry.top]
        messages.append(pb.TokenLogprob(token_id=entry.token_id, text=entry.text, logprob=entry.logprob, top=top))
    return messages


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
        custom_code=info.custom_code,
    )


def score_response(result: ScoreResult) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        total_logprob=result.total_logprob, token_count=result.token_count, perplexity=result.perplexity
    )
