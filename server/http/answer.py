"""One prompt's answer as it builds up from the engine's outputs: the text with its echo, the usage,
and the log-probabilities in the shape the route returns (server/http/logprobs.py).

The echo needs the prompt's text (token-id prompts are decoded) and the first prompt token's
text, which has no log-probability of its own; both come from the engine's tokenizer, off the
event loop.
"""

from __future__ import annotations

import asyncio

from server.http.api import Choice, GenerateCall, Prompt
from server.http.logprobs import LegacyLogprobs, chat_logprobs


class Answer:
    def __init__(self, call: GenerateCall, prompt: Prompt, tokenizer) -> None:
        self._call, self._prompt, self._tokenizer = call, prompt, tokenizer
        self._legacy = LegacyLogprobs() if call.logprobs is not None and not call.chat else None
        self._chat_entries: list = []
        self._parts: list[str] = []
        self._first = True
        self.finish: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    async def add(self, output) -> tuple[str, dict | None]:
        """This output's text (the echo first) and, for a stream, its tokens' log-probabilities."""
        text = output.text
        if self._first:
            self._first = False
            if self._call.echo:
                text = await self._prompt_text() + text
                prompt_entries = getattr(output, "prompt_logprobs", None)
                if self._legacy is not None and prompt_entries:
                    self._legacy.add_first(await self._first_token_text())
                    self._legacy.add(prompt_entries[1:])
        entries = getattr(output, "logprobs", ())
        self._parts.append(text)
        self.finish = output.finish_reason
        self.prompt_tokens, self.completion_tokens = output.prompt_tokens, output.completion_tokens
        if self._legacy is not None:
            self._legacy.add(entries)
            return text, self._legacy.take() if self._call.stream else None
        if self._call.logprobs is not None:
            if self._call.stream:
                return text, chat_logprobs(entries, self._call.logprobs)
            self._chat_entries.extend(entries)
        return text, None

    def choice(self) -> Choice:
        if self._legacy is not None:
            logprobs = self._legacy.take()
        elif self._call.logprobs is not None:
            logprobs = chat_logprobs(self._chat_entries, self._call.logprobs)
        else:
            logprobs = None
        return Choice("".join(self._parts), self.finish, logprobs)

    async def _prompt_text(self) -> str:
        if isinstance(self._prompt, str):
            return self._prompt
        return await asyncio.to_thread(self._tokenizer.decode, list(self._prompt))

    async def _first_token_text(self) -> str:
        def first() -> str:
            ids = self._prompt if isinstance(self._prompt, tuple) else self._tokenizer(self._prompt).input_ids
            return self._tokenizer.decode([ids[0]])

        return await asyncio.to_thread(first)
