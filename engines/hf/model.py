"""One transformers causal LM on one device, and our decode loop over one sequence.

This is the model side of the ``hf-*`` engines, free of threads, queues and servers, so
the offline experiments (bench/) run exactly the code the server runs through this
public surface: ``HFModel.load``, ``generate``, ``next_logits``, ``new_cache``,
``kernel``, ``score_ids`` and ``prompt_logprobs``.

Log-probabilities (engines/logprobs.py) come from the logits the loop computes anyway;
only a request that asks for the prompt's has its prefill keep every position's logits.

The decode loop is ours rather than ``model.generate`` so that each token leaves as soon
as it exists, ``use_cache=False`` really recomputes the whole sequence every step (what
the inference log calls use_cache FALSE; in its one filled-in row, docs/design.md, TRUE and
FALSE gave identical figures), and a caller can stop between two steps simply by not
asking for the next one.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engines import logprobs, model_facts
from engines.base import GenerationOutput, ScoreResult
from engines.completion import Completion
from engines.errors import EngineUnavailable, InvalidRequest
from engines.hf import attention as hf_attention
from engines.hf import compat as transformers_compat
from engines.hf.sampling import make_generator, next_token
from engines.logprobs import TokenLogprob
from engines.params import SamplingParams

if TYPE_CHECKING:
    from engines.hf.static import StaticDecoder

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PROBE_PROMPT = "The attention kernel probe"


class HFModel:
    """Weights, tokenizer and the facts about them that the engine reports."""

    def __init__(
        self,
        path: Path,
        model,
        tokenizer,
        device: torch.device,
        dtype: torch.dtype,
        use_cache: bool,
        implementation: str,
    ) -> None:
        self.path = path
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.use_cache = use_cache
        self.implementation = implementation
        config = model.config
        self.max_context = model_facts.context_length(config)
        self.vocab_size = int(config.vocab_size)
        self.eos_ids = eos_token_ids(model, tokenizer)
        # logits_to_keep=1: only the last position's vocabulary projection is needed, as in
        # transformers' own generate(); without it use_cache=False would also pay for the
        # projection of every earlier position, which is not what the cache comparison is about.
        accepts_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.keep_last = {"logits_to_keep": 1} if accepts_keep else {}
        self.compiled: StaticDecoder | None = None  # set by enable_compile()
        self.attention = self._probe_attention()

    @classmethod
    def load(
        cls,
        path: Path,
        dtype: str = "auto",
        device: str = "auto",
        use_cache: bool = True,
        flash: bool = False,
        trust_remote_code: bool = False,
    ) -> HFModel:
        from transformers import AutoTokenizer

        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        # Always said, never left to transformers: unset, it asks on the terminal (a signal alarm that
        # fails off the main thread) instead of refusing or running the folder's own code.
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        supports_sdpa = model_supports_sdpa(path, trust_remote_code)
        implementation = hf_attention.requested_implementation(flash, torch_device, supports_sdpa)
        model = load_causal_lm(path, torch_dtype, torch_device, implementation, trust_remote_code)
        return cls(path, model, tokenizer, torch_device, torch_dtype, use_cache, implementation)

    @property
    def dtype_name(self) -> str:
        return model_facts.dtype_name(self.dtype)

    def _probe_attention(self) -> str:
        ids = self.tokenizer(_PROBE_PROMPT, return_tensors="pt").input_ids.to(self.device)

        def two_steps():
            with torch.inference_mode(), self.kernel():
                self.next_logits(ids, ids, self.new_cache())

        try:
            return hf_attention.observed_kernel(two_steps)
        except RuntimeError as exc:
            if self.implementation != "sdpa":
                raise
            # Forcing the flash backend failed on this device or dtype: run plain SDPA and say so.
            log.warning("SDPA flash kernel unavailable here (%s); falling back to SDPA's own choice", exc)
            self.implementation = "sdpa-unforced"
            return hf_attention.observed_kernel(two_steps)

    def kernel(self):
        """The attention backend restriction every forward pass runs under."""
        return hf_attention.kernel_context(self.implementation)

    def new_cache(self):
        if not self.use_cache:
            return None
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def next_logits(self, step_input: torch.Tensor, sequence: torch.Tensor, cache) -> torch.Tensor:
        """The next token's logits (float32, vocabulary-sized): from the new tokens and the cache,
        or without a cache from the whole sequence."""
        if self.use_cache:
            out = self.model(input_ids=step_input, past_key_values=cache, use_cache=True, **self.keep_last)
        else:
            out = self.model(input_ids=sequence, use_cache=False, **self.keep_last)
        return out.logits[0, -1].float()

    def prefill_logits(self, prompt: torch.Tensor, cache, all_positions: bool) -> torch.Tensor:
        """The prompt's forward: (rows, vocab) logits as the model gave them, the last position's only
        unless ``all_positions`` (what prompt log-probabilities need)."""
        keep = {} if all_positions else self.keep_last
        if self.use_cache:
            out = self.model(input_ids=prompt, past_key_values=cache, use_cache=True, **keep)
        else:
            out = self.model(input_ids=prompt, use_cache=False, **keep)
        return out.logits[0]

    def enable_compile(self, buckets: tuple[int, ...]) -> None:
        """``--compile``: static caches and a compiled decode step (engines/hf/static.py), warmed up now."""
        from engines.hf.static import StaticDecoder

        if not self.use_cache:
            raise ValueError("--compile needs a KV cache: it is for hf-kv and hf-flash")
        compiled = self.compiled = StaticDecoder(self.model, self.device, self.max_context, buckets)
        params = SamplingParams(max_new_tokens=3, ignore_eos=True)
        filler = self.tokenizer(_PROBE_PROMPT).input_ids

        def run_one(length: int) -> None:
            # A request needing exactly ``length`` positions lands in that bucket and compiles its step.
            prompt = (filler * length)[: length - params.max_new_tokens]
            for _ in self.generate(prompt, params):
                pass

        compiled.warm_up(run_one)

    def generate(
        self, prompt_ids: list[int] | tuple[int, ...], params: SamplingParams
    ) -> Generator[GenerationOutput, None, None]:
        """One output per token; the last has ``finish_reason``.  Stop iterating (or close it) to stop the work."""
        compiled = self.compiled
        lease = None
        if compiled is not None:
            lease = compiled.acquire(len(prompt_ids) + params.max_new_tokens)
            if lease is None:
                log.warning(
                    "request of %d tokens runs uncompiled: longer than the largest static cache (%d)",
                    len(prompt_ids) + params.max_new_tokens,
                    compiled.buckets[-1],
                )
        try:
            yield from self._generate(prompt_ids, params, lease)
        finally:
            if compiled is not None and lease is not None:
                compiled.release(lease)

    def _generate(self, prompt_ids, params: SamplingParams, lease) -> Generator[GenerationOutput, None, None]:
        with torch.inference_mode(), self.kernel():
            n_prompt = len(prompt_ids)
            # Every id of the request in one device buffer: the sampled id is written in place and fed
            # back from there, so no step builds a tensor on the host or concatenates the sequence.
            ids = torch.empty(n_prompt + params.max_new_tokens, dtype=torch.long, device=self.device)
            ids[:n_prompt] = torch.tensor(list(prompt_ids))
            cache = None if lease is not None else self.new_cache()
            generator = make_generator(params, self.device)
            completion = Completion(self.decode_text, params, self.eos_ids, n_prompt)
            scored_prompt = params.prompt_logprobs is not None
            if lease is not None:
                rows = lease.first(self.model, ids, n_prompt, {} if scored_prompt else self.keep_last)
            else:
                rows = self.prefill_logits(ids[None, :n_prompt], cache, all_positions=scored_prompt)
            logits = rows[-1].float()
            prompt_logprobs = None
            if params.prompt_logprobs is not None:
                prompt_logprobs = logprobs.prompt_entries(rows, ids[:n_prompt], params.prompt_logprobs)
            del rows  # every position's logits, when kept, are not held through the decode
            for step in range(params.max_new_tokens):
                n = n_prompt + step
                token_tensor = next_token(logits, ids[:n], params, generator)
                ids[n] = token_tensor
                token = int(token_tensor)  # the one device-to-host sync per token: the id goes to the client
                token_logprobs: tuple[TokenLogprob, ...] = ()
                if params.logprobs is not None:
                    # The raw logits: next_token's penalty and temperature work on copies.
                    token_logprobs = tuple(logprobs.from_logits(logits[None], token_tensor.view(1), params.logprobs))
                text, finish = completion.add(token)
                yield completion.output(text, (token,), finish, token_logprobs, prompt_logprobs if step == 0 else None)
                if finish is not None:
                    return
                if lease is not None:
                    logits = lease.next(ids, n + 1)
                else:
                    logits = self.next_logits(ids[None, n : n + 1], ids[None, : n + 1], cache)

    def score_ids(self, ids: list[int]) -> ScoreResult:
        """Log-likelihood of ``ids[1:]``, each token given the ones before it."""
        with torch.inference_mode(), self.kernel():
            tokens = torch.tensor([ids], device=self.device)
            logits = self.model(input_ids=tokens, use_cache=False).logits[0, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[0, 1:, None])
            return ScoreResult(total_logprob=float(logprobs.sum()), token_count=len(ids) - 1)

    def prompt_logprobs(self, ids, k: int) -> tuple:
        """The log-probability of each of ``ids`` after the ones before it, with ``k`` alternatives; the first None."""
        with torch.inference_mode(), self.kernel():
            tokens = torch.tensor([list(ids)], device=self.device)
            logits = self.model(input_ids=tokens, use_cache=False).logits[0]
            return logprobs.prompt_entries(logits, tokens[0], k)

    def decode_text(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineUnavailable("--device cuda was asked for but torch sees no CUDA device")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 halves memory and doubles speed on GPUs; CPUs without AMX run it slower than float32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidRequest(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}") from None


def load_causal_lm(
    path: Path, dtype: torch.dtype, device: torch.device, implementation: str, trust_remote_code: bool = False
) -> Any:
    """The causal LM at ``path`` with the attention ``implementation``, on ``device``, in eval mode.

    Typed Any: it is whichever class AutoModelForCausalLM picks, a PreTrainedModel with
    GenerationMixin's methods (hf-cb's ``init_continuous_batching``), which no one type names.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=implementation, trust_remote_code=trust_remote_code
    )
    # transformers wraps its Module.to override with functools.wraps, which mypy then reads as unbound.
    model.to(device).eval()  # type: ignore[arg-type]
    return model


def model_supports_sdpa(path, trust_remote_code: bool = False) -> bool:
    """Whether the causal-LM class for the model at ``path`` can run SDPA attention, before loading it."""
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    own_class = (getattr(config, "auto_map", None) or {}).get("AutoModelForCausalLM")
    if own_class and trust_remote_code:
        # The folder's own class (engines/remote_code.py), which transformers' table does not hold.
        model_class: Any = get_class_from_dynamic_module(own_class, path)
    else:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return transformers_compat.class_supports_sdpa(model_class)


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """The ids that end a completion: the generation config's EOS ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(ids)
