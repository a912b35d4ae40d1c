"""One prompt's answer as it builds up from the engine's outputs: the text with its echo, the usage,
and the log-probabilities in the shape the route returns (server/http/logprobs.py).

The outputs themselves are joined by server/whole_output.py, as gRPC's unary call joins them;
what is HTTP's own is the echo and the shapes.  The echo needs the prompt's text (token-id
prompts are decoded) and the first prompt token's text, which has no log-probability of its
own; both come from the engine's tokenizer, off the event loop.
"""

from __future__ import annotations

import asyncio

from server.http.api import Choice
from server.http.logprobs import LegacyLogprobs, chat_logprobs
from server.http.protocol import GenerateCall, Prompt
from server.whole_output import WholeOutput


class Answer:
    def __init__(self, call: GenerateCall, prompt: Prompt, tokenizer) -> None:
        self._call, self._prompt, self._tokenizer = call, prompt, tokenizer
        # The legacy shape's text offsets run on from chunk to chunk, so it is built as outputs arrive.
        self._legacy = LegacyLogprobs() if call.logprobs is not None and not call.chat else None
        self._whole = WholeOutput()
        self._echo = ""

    @property
    def prompt_tokens(self) -> int:
        return self._whole.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self._whole.completion_tokens

    async def add(self, output) -> tuple[str, dict | None]:
        """This output's text (the echo first) and, for a stream, its tokens' log-probabilities."""
        text = output.text
        if not self._whole.parts and self._call.echo:
            self._echo = await self._prompt_text()
            text = self._echo + text
            if self._legacy is not None and output.prompt_logprobs:
                self._legacy.add_first(await self._first_token_text())
                self._legacy.add(output.prompt_logprobs[1:])
        self._whole.add(output)
        if self._legacy is not None:
            self._legacy.add(output.logprobs)
            return text, self._legacy.take() if self._call.stream else None
        if self._call.logprobs is not None and self._call.stream:
            return text, chat_logprobs(output.logprobs, self._call.logprobs)
        return text, None

    def choice(self) -> Choice:
        if self._legacy is not None:
            logprobs = self._legacy.take()
        elif self._call.logprobs is not None:
            logprobs = chat_logprobs(self._whole.logprobs, self._call.logprobs)
        else:
            logprobs = None
        return Choice(self._echo + self._whole.text, self._whole.finish_reason, logprobs)

    async def _prompt_text(self) -> str:
        if isinstance(self._prompt, str):
            return self._prompt
        return await asyncio.to_thread(self._tokenizer.decode, list(self._prompt))

    async def _first_token_text(self) -> str:
        def first() -> str:
            ids = self._prompt if isinstance(self._prompt, tuple) else self._tokenizer(self._prompt).input_ids
            return self._tokenizer.decode([ids[0]])

        return await asyncio.to_thread(first)
