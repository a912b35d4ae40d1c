"""Log-probabilities: the plain types an engine returns, how they are computed from logits, and their text.

The values follow vLLM's default convention (``raw_logprobs``): the log-softmax, natural
log, of the model's logits as the model gave them, before temperature, top-k, top-p or the
repetition penalty.  So a request's log-probabilities do not depend on how it samples, and
every engine returns the same numbers for the same weights.

Engines fill ids and values only; the text of each token is filled in here, once, by
``TokenTexts`` in the request path (engines/base.py), so it is the same whatever the engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engines.text import IncrementalDetokenizer

if TYPE_CHECKING:  # torch only where logits are: the engines package itself imports without it
    import torch

# Rows of logits turned into log-probabilities at once: a long prompt's full-vocabulary
# log-softmax would otherwise double its all-position logits in memory.
_ROWS_PER_CHUNK = 256
# Tokens of context the text of a generated token is decoded with, so spacing rules see what came before.
_CONTEXT_TOKENS = 4


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there (chosen or given), its log-probability, the ``k`` most likely tokens.

    ``top`` is in descending order of log-probability and may hold the token itself.
    """

    token_id: int
    text: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


def from_logits(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> list[TokenLogprob]:
    """``logits``: (n, vocab) raw logits, any float dtype; ``chosen``: (n,) the token at each position.

    Texts are left empty for ``TokenTexts`` to fill.
    """
    import torch

    entries: list[TokenLogprob] = []
    for start in range(0, logits.shape[0], _ROWS_PER_CHUNK):
        rows = torch.log_softmax(logits[start : start + _ROWS_PER_CHUNK].float(), dim=-1)
        ids = chosen[start : start + _ROWS_PER_CHUNK].to(rows.device, torch.long)
        values = rows.gather(1, ids[:, None])[:, 0].tolist()
        if k:
            top = torch.topk(rows, k, dim=-1)
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        else:
            top_values = top_ids = [()] * len(values)
        for token, value, alt_ids, alt_values in zip(ids.tolist(), values, top_ids, top_values, strict=True):
            top_entries = tuple(TopLogprob(i, "", v) for i, v in zip(alt_ids, alt_values, strict=True))
            entries.append(TokenLogprob(token, "", value, top_entries))
    return entries


def prompt_entries(logits: torch.Tensor, prompt_ids: torch.Tensor, k: int) -> tuple[TokenLogprob | None, ...]:
    """The prompt's log-probabilities from the logits at every prompt position (row i predicts token i + 1).

    ``logits`` may hold one row more than needed (the last position's, which predicts the first new token).
    """
    n = prompt_ids.shape[0]
    return (None, *from_logits(logits[: n - 1], prompt_ids[1:], k))


class TokenTexts:
    """The text of each token of one request, as vLLM gives it: decoded without skipping special tokens.

    The tokens that really stand in the sequence (prompt tokens, generated tokens) are decoded
    incrementally: a token that ends a multi-byte character carries that whole character, the
    ones before it carry "", so their texts join to the sequence's text.  An alternative is
    decoded alone.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._prompt_ids = prompt_ids
        self._alone: dict[int, str] = {}
        self._generated: IncrementalDetokenizer | None = None

    def _decode(self, ids) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def prompt(self, entries: tuple[TokenLogprob | None, ...]) -> tuple[TokenLogprob | None, ...]:
        detokenizer = IncrementalDetokenizer(self._decode)
        texts = [detokenizer.push(token) for token in self._prompt_ids]
        return tuple(
            None if entry is None else self._with_texts(entry, text) for entry, text in zip(entries, texts, strict=True)
        )

    def generated(self, entries: tuple[TokenLogprob, ...]) -> tuple[TokenLogprob, ...]:
        if self._generated is None:
            # Primed with the prompt's last tokens: the first new token's text is what it adds after them.
            self._generated = IncrementalDetokenizer(self._decode)
            for token in self._prompt_ids[-_CONTEXT_TOKENS:]:
                self._generated.push(token)
        return tuple(self._with_texts(entry, self._generated.push(entry.token_id)) for entry in entries)

    def _with_texts(self, entry: TokenLogprob, text: str) -> TokenLogprob:
        missing = [alt.token_id for alt in entry.top if alt.token_id not in self._alone]
        if missing:
            for token, piece in zip(missing, self._tokenizer.batch_decode([[t] for t in missing]), strict=True):
                self._alone[token] = piece
        top = tuple(
            dataclasses.replace(alt, text=text if alt.token_id == entry.token_id else self._alone[alt.token_id])
            for alt in entry.top
        )
        return dataclasses.replace(entry, text=text, top=top)
