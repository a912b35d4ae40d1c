"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

Runs on the model's device, one sequence at a time; the generator is per request so a
seed reproduces a completion whatever else the server is doing.
"""

from __future__ import annotations

import random

import torch

from engines.params import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else random.getrandbits(63)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def choose_next_token(
    logits: torch.Tensor, seen_ids: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """``logits``: float32 (vocab,); ``seen_ids``: prompt and generated ids so far."""
    return int(next_token(logits, seen_ids, params, generator))


def next_token(
    logits: torch.Tensor, seen_ids: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """As ``choose_next_token``, but the id stays a 0-d tensor on the model's device, so the decode
    loop can feed it to the next step without a round trip through the host."""
    if params.repetition_penalty != 1.0:
        logits = _apply_repetition_penalty(logits, seen_ids, params.repetition_penalty)
    if params.greedy:
        return torch.argmax(logits)
    logits = logits / params.temperature
    if params.top_k:
        kth_largest = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if params.top_p < 1.0:
        logits = _apply_top_p(logits, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]


def _apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    # The CTRL paper's rule, as transformers applies it: shrink positive logits, grow negative ones.
    scores = logits.gather(0, seen_ids)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, seen_ids, scores)


def _apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # Drop a token when the tokens before it already reach top_p; the first always stays.
    drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
