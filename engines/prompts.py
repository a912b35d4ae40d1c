"""Prompt text to token ids, the same way for every engine, so usage counts agree across engines.

Two guards sit here because every engine shares them:

- A text too long for the model is refused before it is tokenized.  No token of this
  tokenizer covers more than ``max_token_chars`` characters, so a text of N characters
  needs at least N / max_token_chars tokens: past ``max_context * max_token_chars``
  characters it cannot fit, and a 4 MiB prompt costs a length check, not seconds of
  tokenizing and gigabytes of memory.  (This holds for tokenizers whose normalizer never
  shrinks text: byte-level BPE and SentencePiece, which is every model here.)
- With the chat template, the caller's text stays text: a ``<|im_start|>`` typed in any
  message is split into ordinary tokens, so a prompt cannot forge a system or assistant turn.

A prompt is either plain text (gRPC's ``prompt``, with ``use_chat_template`` for one user
turn) or a ``Conversation``, a list of chat messages (the HTTP front end's chat completions).
Both go through the one template path below, so a single user turn renders the same either way.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable

from engines.errors import InvalidRequest

# Stands in for each message's text while the template is rendered; plain letters and digits
# survive any template, and the number says which message's text goes there.
_USER_TEXT_MARKER = "YAYIUSERTEXTMARKER7f3a9c"
_MARKER = re.compile(_USER_TEXT_MARKER + r"n(\d+)n")
# The roles every chat template here knows. Any other string would be written into the template
# as the caller gave it, which is a way to forge a turn.
CHAT_ROLES = ("system", "user", "assistant")
# Far more turns than any context here holds; it bounds the template's work for a hostile list.
MAX_CHAT_MESSAGES = 1024


class Conversation(str):
    """Chat messages as a prompt that any engine takes where it takes text.

    As a ``str`` it is the messages' texts joined by newlines: what the length guard, logs and
    the test-only fault markers see.  ``messages`` holds the (role, text) pairs the chat
    template renders.
    """

    messages: tuple[tuple[str, str], ...]

    def __new__(cls, messages: Iterable[tuple[str, str]]) -> Conversation:
        messages = tuple(messages)
        if not messages:
            raise InvalidRequest("messages must hold at least one message")
        if len(messages) > MAX_CHAT_MESSAGES:
            raise InvalidRequest(f"messages holds at most {MAX_CHAT_MESSAGES} messages, got {len(messages)}")
        for index, (role, _) in enumerate(messages):
            if role not in CHAT_ROLES:
                raise InvalidRequest(f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        self = super().__new__(cls, "\n".join(text for _, text in messages))
        self.messages = messages
        return self


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
        """Plain text as it is; with the template, one user turn; a Conversation always with the template."""
        if isinstance(prompt, Conversation):
            return self.encode_chat(prompt.messages)
        if not use_chat_template:
            return self.tokenizer(prompt).input_ids
        return self.encode_chat((("user", prompt),))

    def encode_chat(self, messages: tuple[tuple[str, str], ...]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest(
                f"model {self.model_name!r} has no chat template: start the server with --chat-template FILE "
                "(a Jinja chat template, as vLLM takes it), or send the prompt as plain text "
                "(gRPC: use_chat_template=false; HTTP: /v1/completions)"
            )
        rendered = self.tokenizer.apply_chat_template(
            [{"role": role, "content": f"{_USER_TEXT_MARKER}n{index}n"} for index, (role, _) in enumerate(messages)],
            tokenize=False,
            add_generation_prompt=True,
        )
        # Even pieces are the template's own text, odd ones the number of the message placed there.
        pieces = _MARKER.split(rendered)
        placed = sorted(int(number) for number in pieces[1::2])
        if placed != list(range(len(messages))) or _USER_TEXT_MARKER in "".join(pieces[::2]):
            raise InvalidRequest(
                f"model {self.model_name!r}: its chat template does not place each message's text "
                "verbatim; send the prompt as plain text and format it yourself"
            )
        # The template's own parts keep their special tokens; the caller's parts never get any.
        ids: list[int] = []
        for position, piece in enumerate(pieces):
            if position % 2 == 0:
                ids += self.tokenizer(piece, add_special_tokens=False).input_ids if piece else []
            else:
                text = messages[int(piece)][1]
                ids += self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
        return ids
