"""Per-request sampling inside transformers' continuous-batching manager (engine ``hf-cb``).

The manager samples one way for the whole batch (its generation config), and its own
per-request processors cover temperature, top-k and top-p only: no seed per request and
no repetition penalty over a request's history.  So every request that is not plain
greedy gets a ``RequestSampler`` here, and one logits processor, run by the manager on
the batch's logits, picks that request's token with our own sampling code
(engines/hf/sampling.py, the code hf-kv runs, with a ``torch.Generator`` per request) and
leaves only the chosen token finite: the manager's greedy argmax then picks exactly it.
Plain greedy rows are left alone, so their argmax is the manager's own.

Log-probabilities are taken here too.  The manager's own (``return_logprobs``) are one
value per token, with no alternatives, for the whole batch or none, and taken after the
processors, where ours has left only the chosen token finite (a log-probability of 0).
This processor sees each row's logits as the model gave them, so a request that asks
gets a sampler, and its sampler records each chosen token's entry before choosing.

Imported only when the engine starts: it subclasses a transformers class.
"""

from __future__ import annotations

import itertools

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.logits_process import LogitsProcessorList

from engines import logprobs
from engines.hf.sampling import choose_next_token, make_generator
from engines.params import SamplingParams

# The add_request keyword that carries a request's sampler key to the processor.
SAMPLER_KWARG = "yayi_sampler"
_NO_SAMPLER = -1


def needs_sampler(params: SamplingParams) -> bool:
    """Whether the manager's own argmax is not enough for these parameters."""
    return not params.greedy or params.repetition_penalty != 1.0 or params.logprobs is not None


class RequestSampler:
    """One request's sampling state: its parameters, its generator and every token it has seen."""

    def __init__(self, prompt_ids, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.generator = make_generator(params, device)
        self.device = device
        # The processor sees one position per request, not the history: the penalty needs this copy.
        self.seen = list(prompt_ids)
        # One entry per generated token, in order, when the request asked for log-probabilities. Appended in
        # the manager's thread before the token is handed out, so a snapshot's tokens always have theirs.
        self.logprobs: list[logprobs.TokenLogprob] = []

    def choose(self, logits: torch.Tensor) -> int:
        """``logits``: this request's row, the model's raw float32 logits (read, not changed)."""
        seen = torch.tensor(self.seen, device=self.device)
        token = choose_next_token(logits, seen, self.params, self.generator)
        if self.params.logprobs is not None:
            chosen = torch.tensor([token], device=logits.device)
            self.logprobs.extend(logprobs.from_logits(logits[None], chosen, self.params.logprobs))
        self.seen.append(token)
        return token


class SamplerTable:
    """Samplers by key: written by the event loop, read by the manager's thread.

    A dict read and written one key at a time is safe across threads under the GIL; a
    sampler dropped while its request still sits in a batch only leaves that row to the
    argmax, for a token nobody will read.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._samplers: dict[int, RequestSampler] = {}
        self._keys = itertools.count()

    def add(self, prompt_ids, params: SamplingParams) -> int:
        key = next(self._keys)
        self._samplers[key] = RequestSampler(prompt_ids, params, self.device)
        return key

    def remove(self, key: int | None) -> None:
        if key is not None:
            self._samplers.pop(key, None)

    def get(self, key: int) -> RequestSampler | None:
        return self._samplers.get(key)

    def __len__(self) -> int:
        return len(self._samplers)


class PerRequestSampling(ContinuousBatchingLogitsProcessor):
    """Runs in the manager's thread on the float32 logits of the rows that get a token this step."""

    supported_kwargs = {SAMPLER_KWARG: int}
    ignored_kwargs = ()

    def __init__(self, table: SamplerTable) -> None:
        self.table = table

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(_NO_SAMPLER)

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        keys = [
            request.state.logit_processor_kwargs.get(SAMPLER_KWARG, _NO_SAMPLER) for request in requests_with_new_token
        ]
        return torch.tensor(keys, dtype=torch.int32)

    def __call__(self, scores: torch.FloatTensor, tensor_arg: torch.Tensor) -> torch.FloatTensor:
        keys = tensor_arg[: scores.size(0)].tolist()
        for row, key in enumerate(keys):
            sampler = self.table.get(key) if key != _NO_SAMPLER else None
            if sampler is None:
                continue
            token = sampler.choose(scores[row])
            scores[row].fill_(float("-inf"))
            scores[row, token] = 0.0
        return scores


def processor_list(table: SamplerTable) -> ContinuousBatchingLogitsProcessorList:
    """The manager's processor list holding only ours, with the one argument row it needs."""
    processors = ContinuousBatchingLogitsProcessorList(LogitsProcessorList([PerRequestSampling(table)]))
    # The list counts argument rows only for the processors it converts itself; ours needs one.
    processors.tensors_required = 1
    return processors
