"""Prompt text to token ids, the same way for every engine, so usage counts agree across engines.

Two guards sit here because every engine shares them:

- A text too long for the model is refused before it is tokenized.  No token of this
  tokenizer covers more than ``max_token_chars`` characters, so a text of N characters
  needs at least N / max_token_chars tokens: past ``max_context * max_token_chars``
  characters it cannot fit, and a 4 MiB prompt costs a length check, not seconds of
  tokenizing and gigabytes of memory.  (This holds for tokenizers whose normalizer never
  shrinks text: byte-level BPE and SentencePiece, which is every model here.)
- With the chat template, the user's text stays text: a ``<|im_start|>`` typed by the user
  is split into ordinary tokens, so a prompt cannot forge a system or assistant turn.
"""

from __future__ import annotations

import asyncio

from .errors import InvalidRequest

# Stands in for the user's text while the template is rendered; plain letters survive any template.
_USER_TEXT_MARKER = "YAYIUSERTEXTMARKER7f3a9c"


def longest_token_chars(tokenizer) -> int:
    """The most characters one token's text can hold: for byte-level BPE a vocabulary entry is one
    character per byte, and a byte decodes to at most one character, so the entry's length bounds it."""
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return max(longest, *(len(str(token)) for token in added.values()), 1)


class PromptTokenizer:
    def __init__(self, tokenizer, max_context: int, model_name: str) -> None:
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.model_name = model_name
        self.max_token_chars = longest_token_chars(tokenizer)

    def char_limit(self, token_limit: int) -> int:
        """Characters beyond which a text is sure to need more than ``token_limit`` tokens."""
        return token_limit * self.max_token_chars

    def check_chars(self, text: str, token_limit: int, what: str = "prompt") -> None:
        if len(text) > self.char_limit(token_limit):
            raise InvalidRequest(
                f"{what} is {len(text)} characters, more than the model's context of {token_limit} tokens can hold "
                f"(a token of this tokenizer covers at most {self.max_token_chars} characters); shorten the {what}"
            )

    async def encode(self, prompt: str, use_chat_template: bool) -> list[int]:
        self.check_chars(prompt, self.max_context)
        return await asyncio.to_thread(self.encode_now, prompt, use_chat_template)

    async def encode_text(self, text: str, limit: int) -> list[int]:
        """A text to score: no template, the same length guard."""
        self.check_chars(text, limit, what="text")
        return await asyncio.to_thread(lambda: self.tokenizer(text).input_ids)

    def encode_now(self, prompt: str, use_chat_template: bool) -> list[int]:
        if not use_chat_template:
            return self.tokenizer(prompt).input_ids
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest(f"model {self.model_name!r} has no chat template; send use_chat_template=false")
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": _USER_TEXT_MARKER}], tokenize=False, add_generation_prompt=True
        )
        before, found, after = rendered.partition(_USER_TEXT_MARKER)
        if not found or _USER_TEXT_MARKER in after:
            raise InvalidRequest(
                f"model {self.model_name!r}: its chat template does not place the user's text "
                "verbatim; send use_chat_template=false and format the prompt yourself"
            )
        # The template's own parts keep their special tokens; the user's part never gets any.
        return (
            self.tokenizer(before, add_special_tokens=False).input_ids
            + self.tokenizer(prompt, add_special_tokens=False, split_special_tokens=True).input_ids
            + self.tokenizer(after, add_special_tokens=False).input_ids
        )
