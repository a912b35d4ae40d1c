"""Log-probabilities in OpenAI's two shapes, from the engine's per-token entries.

Completions use the legacy shape vLLM also returns (and lm-evaluation-harness reads):
``tokens``, ``token_logprobs``, ``top_logprobs`` (a dict text -> logprob per token, the chosen
token among them) and ``text_offset`` (each token's start in the choice's text).  With echo the
prompt's tokens come first; the first has no log-probability (``null``), as nothing precedes it.
Chat uses ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``.

An entry is an engine's ``TokenLogprob`` (token_id, text, logprob, top); None stands for the
first prompt token, whose text the caller supplies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class LegacyLogprobs:
    """The completions shape, built up as tokens arrive (a stream adds a few at a time)."""

    offset: int = 0  # where the next token starts in the choice's text
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add_first(self, text: str) -> None:
        """The prompt's first token: in the text, with no log-probability."""
        self._add(text, None, None)

    def add(self, entries: Sequence) -> None:
        for entry in entries:
            top = {alternative.text: alternative.logprob for alternative in entry.top}
            top[entry.text] = entry.logprob  # the chosen token is always among them, as in vLLM's
            self._add(entry.text, entry.logprob, top)

    def take(self) -> dict:
        """What was added since the last take, as one response's ``logprobs`` (the offsets run on)."""
        body = {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return body

    def _add(self, text: str, logprob: float | None, top: dict | None) -> None:
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(text)


def chat_logprobs(entries: Sequence, top: int) -> dict:
    """The chat shape for these tokens, with ``top`` alternatives each."""
    return {
        "content": [
            {
                **_chat_entry(entry),
                "top_logprobs": [
                    {
                        "token": alternative.text,
                        "logprob": alternative.logprob,
                        "bytes": list(alternative.text.encode()),
                    }
                    for alternative in entry.top[:top]
                ],
            }
            for entry in entries
        ]
    }


def _chat_entry(entry) -> dict:
    return {"token": entry.text, "logprob": entry.logprob, "bytes": list(entry.text.encode())}
