"""Sampling parameters: one frozen dataclass, validated in one place.

Range checks that need no model live in ``__post_init__``; the checks that need the
model's context length and vocabulary live in ``check_against_model``.  Every message
names the field and the limit, because it reaches the client verbatim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engines.errors import InvalidRequest

DEFAULT_MAX_NEW_TOKENS = 128
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
# vLLM refuses temperatures above 2 (as OpenAI's API does): one limit for every engine.
MAX_TEMPERATURE = 2.0
# Below this a temperature is greedy, as in vLLM: dividing logits by less overflows float32.
GREEDY_BELOW_TEMPERATURE = 1e-5
# Dividing logits by a penalty far below 1 overflows to infinity and the sampler gets NaN.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
# As vLLM's max_logprobs default and OpenAI's legacy completions limit.
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    ignore_eos: bool = False
    # None: none. k: each token's log-probability and the k most likely tokens (engines/logprobs.py).
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for every prompt token but the first
    # Token ids that end the completion as a stop string does (finish "stop"), beside the model's own
    # end-of-sequence ids; unlike those, ignore_eos leaves them in force (as vLLM's stop_token_ids).
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        # Tolerate a list from callers; the frozen object itself holds a tuple.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check_stop_token_ids(self.stop_token_ids)
        _check_logprobs("logprobs", self.logprobs)
        _check_logprobs("prompt_logprobs", self.prompt_logprobs)
        if self.max_new_tokens < 1 and not (self.max_new_tokens == 0 and self.prompt_logprobs is not None):
            # Zero new tokens only scores the prompt, which is what prompt_logprobs returns.
            raise InvalidRequest(
                f"max_new_tokens must be at least 1 (0 only with prompt_logprobs, to score the prompt), "
                f"got {self.max_new_tokens}",
                field="max_new_tokens",
            )
        _check_finite("temperature", self.temperature)
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidRequest(
                f"temperature must be between 0 (greedy) and {MAX_TEMPERATURE:g}, got {self.temperature:g}",
                field="temperature",
            )
        _check_finite("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p:g}", field="top_p")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be 0 (off) or positive, got {self.top_k}", field="top_k")
        _check_finite("repetition_penalty", self.repetition_penalty)
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise InvalidRequest(
                f"repetition_penalty must be between {MIN_REPETITION_PENALTY:g} and "
                f"{MAX_REPETITION_PENALTY:g} (1 = off), got {self.repetition_penalty:g}",
                field="repetition_penalty",
            )
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}", field="stop")
        for text in self.stop:
            if not text:
                raise InvalidRequest("stop strings must not be empty", field="stop")
            if len(text) > MAX_STOP_STRING_CHARS:
                raise InvalidRequest(
                    f"each stop string is at most {MAX_STOP_STRING_CHARS} characters, got one of {len(text)}",
                    field="stop",
                )
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequest(f"seed must be in [0, 2^63), got {self.seed}", field="seed")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


def check_against_model(params: SamplingParams, prompt_tokens: int, max_context: int, vocab_size: int) -> None:
    """Reject what this model cannot do: prompts or completions past its context."""
    if prompt_tokens == 0:
        raise InvalidRequest("prompt must not be empty", field="prompt")
    if prompt_tokens >= max_context:
        raise InvalidRequest(
            f"prompt is {prompt_tokens} tokens but the model's context is {max_context} tokens; shorten the prompt",
            field="prompt",
        )
    if prompt_tokens + params.max_new_tokens > max_context:
        raise InvalidRequest(
            f"max_new_tokens={params.max_new_tokens} with a {prompt_tokens}-token prompt exceeds the "
            f"model's context of {max_context} tokens; ask for at most {max_context - prompt_tokens}",
            field="max_new_tokens",
        )
    for token in params.stop_token_ids:
        if token >= vocab_size:
            raise InvalidRequest(
                f"stop_token_ids must be ids of the model's vocabulary, below {vocab_size}; got {token}",
                field="stop_token_ids",
            )
    if params.top_k > vocab_size:
        raise InvalidRequest(
            f"top_k must be at most the vocabulary size {vocab_size}, got {params.top_k}", field="top_k"
        )


def check_score_length(token_count: int, max_context: int) -> None:
    if token_count < 2:
        raise InvalidRequest("text must be at least 2 tokens long to be scored", field="text")
    if token_count > max_context:
        raise InvalidRequest(
            f"text is {token_count} tokens but the model's context is {max_context}; score it in parts",
            field="text",
        )


def check_prompt_text(prompt: str) -> None:
    if not prompt or not prompt.strip():
        raise InvalidRequest("prompt must not be empty or whitespace only", field="prompt")


def check_prompt_ids(ids, vocab_size: int) -> tuple[int, ...]:
    """A prompt given as token ids: a non-empty sequence of ids of this vocabulary."""
    ids = tuple(ids)
    if not ids:
        raise InvalidRequest("prompt must not be empty: the list of token ids is empty", field="prompt")
    for position, token in enumerate(ids):
        # bool is an int to Python, but True as a token id is a caller's mistake.
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise InvalidRequest(
                f"prompt token ids must be integers in [0, {vocab_size}), the model's vocabulary; "
                f"position {position} holds {token!r}",
                field="prompt",
            )
    return ids


def _check_logprobs(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
        raise InvalidRequest(
            f"{name} must be an integer between 0 (the token's own only) and {MAX_LOGPROBS}, got {value!r}",
            field=name,
        )


def _check_stop_token_ids(ids: tuple[int, ...]) -> None:
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest(
            f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}", field="stop_token_ids"
        )
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise InvalidRequest(
                f"stop_token_ids must be non-negative integer token ids, got {token!r}", field="stop_token_ids"
            )


def _check_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number, got {value}", field=name)
