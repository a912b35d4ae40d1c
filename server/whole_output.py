"""One generation's outputs joined into the whole answer, for the calls that answer at once
(gRPC's unary Generate, HTTP's unstreamed completions): the text, the token ids, the
log-probabilities, how it ended and the usage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engines.base import GenerationOutput
from engines.logprobs import TokenLogprob


@dataclass
class WholeOutput:
    parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # The prompt's, when asked: they come on the first output only.
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()
    finish_reason: str | None = None  # set by the last output: every generation ends with one
    prompt_tokens: int = 0
    completion_tokens: int = 0  # the counts are running totals, so the latest output's are the whole's

    def add(self, output: GenerationOutput) -> None:
        self.parts.append(output.text)
        self.token_ids.extend(output.token_ids)
        self.logprobs.extend(output.logprobs)
        self.prompt_logprobs = self.prompt_logprobs or output.prompt_logprobs or ()
        self.finish_reason = output.finish_reason
        self.prompt_tokens, self.completion_tokens = output.prompt_tokens, output.completion_tokens

    @property
    def text(self) -> str:
        return "".join(self.parts)
