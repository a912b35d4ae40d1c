"""One request's generated tokens to its outputs, for the engines that run our own text step.

Each token gets its finish reason (EOS unless ignored, then the length bound), its text
(whole characters only, engines/text.py) and the stop-string check; at the end whatever
was held back is let go.  The outputs carry the usage counts.  hf-kv's decode loop
(engines/hf/model.py) and hf-cb's snapshots (engines/hf_cb/engine.py) both go through this, so
the two cannot disagree on where a completion ends or what text it had.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from engines.base import GenerationOutput
from engines.logprobs import TokenLogprob
from engines.params import SamplingParams
from engines.text import IncrementalDetokenizer, StopStringFilter


class Completion:
    """The text step of one request: tokens in, (text, finish reason) out, with the counts."""

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        params: SamplingParams,
        eos_ids: Iterable[int],
        prompt_tokens: int,
    ) -> None:
        self._params = params
        self._eos_ids = frozenset(eos_ids)
        self._stop_ids = frozenset(params.stop_token_ids)
        self._detokenizer = IncrementalDetokenizer(decode)
        self._stops = StopStringFilter(params.stop)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    def add(self, token: int, last: bool = False) -> tuple[str, str | None]:
        """The text ``token`` lets go and the finish reason it brings (None while the completion goes on).

        ``last``: the backend says no token follows this one, whatever the bound; that reads as "length".
        """
        self.completion_tokens += 1
        finish = None
        if token in self._stop_ids:
            # As a stop string: it ends the completion and its text is not returned (the id is).
            return self._detokenizer.flush() + self._stops.flush(), "stop"
        if token in self._eos_ids and not self._params.ignore_eos:
            finish = "eos"
        elif last or self.completion_tokens >= self._params.max_new_tokens:
            finish = "length"
        piece = self._detokenizer.push(token)
        if finish is not None:
            piece += self._detokenizer.flush()
        text, hit_stop = self._stops.push(piece)
        if hit_stop:
            return text, "stop"
        if finish is not None:
            text += self._stops.flush()
        return text, finish

    def output(
        self,
        text: str,
        token_ids: tuple[int, ...],
        finish_reason: str | None,
        logprobs: tuple[TokenLogprob, ...] = (),
        prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None,
    ) -> GenerationOutput:
        """An output of this request, with its usage counts so far."""
        return GenerationOutput(
            text=text,
            token_ids=token_ids,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            finish_reason=finish_reason,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
