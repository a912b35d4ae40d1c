"""The Hugging Face engine, configured three ways: no cache, KV cache, KV cache + flash attention.

The decode loop is ours rather than ``model.generate`` so that each token leaves as soon
as it exists, ``use_cache=False`` really recomputes the whole sequence every step (the
inference log's use_cache FALSE), and a cancelled request stops between two steps.
The loop runs in worker threads (torch releases the GIL inside its kernels); the event
loop only moves finished tokens to the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from . import faults, hf_attention
from .admission import Admission
from .base import Engine, EngineConfig, EngineInfo, EngineLoad, GenerationOutput, ScoreResult
from .errors import EngineOutOfMemory, EngineUnavailable, InvalidRequest
from .models import resolve_model
from .params import SamplingParams, check_against_model, check_prompt_text, check_score_length
from .prompts import encode_prompt
from .sampling import choose_next_token, make_generator
from .text import IncrementalDetokenizer, StopStringFilter

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PROBE_PROMPT = "The attention kernel probe"


@dataclass(eq=False)
class _Job:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    fault: faults.Fault | None = None  # test-only, see engines/faults.py


class HFEngine(Engine):
    """A transformers causal LM. Subclasses fix the cache and attention choices."""

    use_cache: bool = True
    flash: bool = False
    engine_name: str = "hf"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._ready = False
        self._closing = False
        self._admission: Admission | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._live_jobs: set[_Job] = set()
        self._failure: str | None = None  # set once the device cannot be trusted any more
        self.out_of_memory_count = 0

    # ---- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        # Loading, probing and decoding share the worker threads: torch's OpenMP pool then
        # belongs to the threads that use it, rather than a team per passing thread.
        self._slots = self.config.max_concurrency or 1
        self._executor = ThreadPoolExecutor(self._slots, thread_name_prefix=f"{self.engine_name}-worker")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)
        self._admission = Admission(self._slots, self.config.max_queue)
        self._ready = True

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._path = resolve_model(self.config.model)
        self._device = _resolve_device(self.config.device)
        self._dtype = _resolve_dtype(self.config.dtype, self._device)
        self.tokenizer = AutoTokenizer.from_pretrained(self._path)
        supports_sdpa = _model_supports_sdpa(self._path)
        self._implementation = hf_attention.requested_implementation(self.flash, self._device, supports_sdpa)
        self.model = AutoModelForCausalLM.from_pretrained(self._path, dtype=self._dtype,
                                                          attn_implementation=self._implementation)
        self.model.to(self._device).eval()
        model_config = self.model.config
        self._max_context = int(getattr(model_config, "max_position_embeddings", 0) or 2048)
        self._vocab_size = int(model_config.vocab_size)
        self._eos_ids = _eos_token_ids(self.model, self.tokenizer)
        accepts_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._keep_last = {"logits_to_keep": 1} if accepts_keep else {}
        self._attention = self._probe_attention()
        log.info("%s on %s: %s %s, attention kernel %s, use_cache=%s", self.engine_name, self._device,
                 self.config.model, str(self._dtype).removeprefix("torch."), self._attention, self.use_cache)

    def _probe_attention(self) -> str:
        ids = self.tokenizer(_PROBE_PROMPT, return_tensors="pt").input_ids.to(self._device)

        def two_steps():
            with torch.inference_mode(), self._kernel():
                self._next_logits(ids, ids, self._new_cache())

        try:
            return hf_attention.observed_kernel(two_steps)
        except RuntimeError as exc:
            if self._implementation != "sdpa":
                raise
            # Forcing the flash backend failed on this device or dtype: run plain SDPA and say so.
            log.warning("SDPA flash kernel unavailable here (%s); falling back to SDPA's own choice", exc)
            self._implementation = "sdpa-unforced"
            return hf_attention.observed_kernel(two_steps)

    def _kernel(self):
        return hf_attention.kernel_context(self._implementation)

    async def shutdown(self) -> None:
        self._closing = True
        self._ready = False
        for job in list(self._live_jobs):
            job.cancelled.set()
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    # ---- what the server asks ---------------------------------------------------------

    def info(self) -> EngineInfo:
        self._require_ready()
        return EngineInfo(
            engine=self.engine_name, model=self.config.model, dtype=str(self._dtype).removeprefix("torch."),
            device=str(self._device), attention=self._attention, use_cache=self.use_cache,
            max_context=self._max_context, vocab_size=self._vocab_size,
            max_concurrent_requests=self._slots, max_queue=self.config.max_queue,
            model_path=str(self._path),
        )

    @property
    def healthy(self) -> bool:
        return self._failure is None

    def load(self) -> EngineLoad:
        if self._admission is None:
            return EngineLoad(running=0, waiting=0)
        return EngineLoad(running=self._admission.running, waiting=self._admission.waiting)

    async def generate(self, prompt: str, params: SamplingParams, request_id: str,
                       use_chat_template: bool = False) -> AsyncIterator[GenerationOutput]:
        self._require_ready()
        check_prompt_text(prompt)
        prompt_ids = await asyncio.to_thread(encode_prompt, self.tokenizer, prompt, use_chat_template, self.config.model)
        check_against_model(params, len(prompt_ids), self._max_context, self._vocab_size)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        async with self._admission.slot():
            self._require_ready()
            started_at = time.monotonic()
            job = _Job(prompt_ids, params, emit=lambda item: _put_threadsafe(loop, outputs, item),
                       fault=faults.for_prompt(prompt))
            self._live_jobs.add(job)
            worker = loop.run_in_executor(self._executor, self._decode, job)
            try:
                while True:
                    item = await outputs.get()
                    if isinstance(item, BaseException):
                        raise item
                    if started_at is not None:
                        item, started_at = dataclasses.replace(item, started_at=started_at), None
                    yield item
                    if item.finish_reason is not None:
                        return
            finally:
                # Reached on completion, error, consumer cancel or disconnect alike: the worker
                # stops at its next step and the slot is released only once it has.
                job.cancelled.set()
                with contextlib.suppress(BaseException):
                    await asyncio.shield(worker)
                self._live_jobs.discard(job)

    async def score(self, text: str) -> ScoreResult:
        self._require_ready()
        check_prompt_text(text)
        ids = await asyncio.to_thread(lambda: self.tokenizer(text).input_ids)
        check_score_length(len(ids), self._max_context)
        out_of_memory = None
        async with self._admission.slot():
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(self._executor, self._score_ids, ids)
            except torch.OutOfMemoryError as exc:
                out_of_memory = f"device out of memory while scoring: {exc}".splitlines()[0]
        # Outside the except clause, as in _decode: the exception no longer pins the activations.
        self.out_of_memory_count += 1
        _free_device_cache(self._device)
        raise EngineOutOfMemory(out_of_memory)

    # ---- worker-thread side -----------------------------------------------------------

    def _decode(self, job: _Job) -> None:
        out_of_memory = None
        try:
            with torch.inference_mode(), self._kernel():
                self._decode_steps(job)
        except torch.OutOfMemoryError as exc:
            out_of_memory = f"device out of memory while generating: {exc}".splitlines()[0]
        except torch.AcceleratorError as exc:
            # A CUDA error (illegal address, device-side assert) poisons the whole context: every
            # later kernel fails too, so the engine says it is done rather than fail each request.
            self._failure = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            log.error("device failed, engine stops serving: %s", self._failure)
            job.emit(EngineUnavailable(f"the device failed ({self._failure}); restart the server"))
        except BaseException as exc:  # handed to the consumer, which raises it in its own task
            log.exception("decode step failed")
            job.emit(exc)
        if out_of_memory is not None:
            # Freed only here, once the except clause has dropped the exception: its traceback held
            # the step's frames and with them this request's KV cache and activations.
            self.out_of_memory_count += 1
            _free_device_cache(self._device)
            log.warning("%s (out-of-memory events so far: %d); cache freed, serving on",
                        out_of_memory, self.out_of_memory_count)
            job.emit(EngineOutOfMemory(out_of_memory))

    def _decode_steps(self, job: _Job) -> None:
        params = job.params
        prompt = torch.tensor([job.prompt_ids], device=self._device)
        sequence = prompt
        step_input = prompt
        cache = self._new_cache()
        generator = make_generator(params, self._device)
        detokenizer = IncrementalDetokenizer(self._decode_text)
        stops = StopStringFilter(params.stop)
        for step in range(params.max_new_tokens):
            if job.fault is not None and step == job.fault.step:
                self._inject(job.fault)
            if job.cancelled.is_set():
                # Seen only if the consumer is still there, i.e. the engine is shutting down.
                job.emit(GenerationOutput(text="", token_ids=(), prompt_tokens=len(job.prompt_ids),
                                          completion_tokens=step, finish_reason="cancelled"))
                return
            logits = self._next_logits(step_input, sequence, cache)
            token = choose_next_token(logits, sequence[0], params, generator)
            token_tensor = torch.tensor([[token]], device=self._device)
            sequence = torch.cat([sequence, token_tensor], dim=1)
            step_input = token_tensor
            finish = "eos" if token in self._eos_ids and not params.ignore_eos else None
            if finish is None and step == params.max_new_tokens - 1:
                finish = "length"
            piece = detokenizer.push(token)
            if finish is not None:
                piece += detokenizer.flush()
            text, hit_stop = stops.push(piece)
            if hit_stop:
                finish = "stop"
            elif finish is not None:
                text += stops.flush()
            job.emit(GenerationOutput(text=text, token_ids=(token,), prompt_tokens=len(job.prompt_ids),
                                      completion_tokens=step + 1, finish_reason=finish))
            if finish is not None:
                return

    def _inject(self, fault: faults.Fault) -> None:
        """Raises what the real failure of this kind raises here (test-only, engines/faults.py)."""
        if fault.kind == "error":
            raise faults.InjectedFault(f"injected engine fault ({fault.marker})")
        if fault.kind == "fatal":
            raise torch.AcceleratorError(f"CUDA error: an illegal memory access was encountered (injected, {fault.marker})")
        if self._device.type == "cuda":
            # A real out-of-memory: fill the device until its allocator refuses, so the check
            # that the memory comes back is a check of the real thing.
            blocks = []
            while True:
                blocks.append(torch.empty(2**30, dtype=torch.uint8, device=self._device))
        raise torch.OutOfMemoryError(f"CPU out of memory (injected, {fault.marker})")

    def _new_cache(self):
        if not self.use_cache:
            return None
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _next_logits(self, step_input: torch.Tensor, sequence: torch.Tensor, cache) -> torch.Tensor:
        # logits_to_keep=1: only the last position's vocabulary projection is needed, as in
        # transformers' own generate(); without it use_cache=False would also pay for the
        # projection of every earlier position, which is not what the cache comparison is about.
        if self.use_cache:
            out = self.model(input_ids=step_input, past_key_values=cache, use_cache=True, **self._keep_last)
        else:
            out = self.model(input_ids=sequence, use_cache=False, **self._keep_last)
        return out.logits[0, -1].float()

    def _score_ids(self, ids: list[int]) -> ScoreResult:
        with torch.inference_mode(), self._kernel():
            tokens = torch.tensor([ids], device=self._device)
            logits = self.model(input_ids=tokens, use_cache=False).logits[0, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[0, 1:, None])
            return ScoreResult(total_logprob=float(logprobs.sum()), token_count=len(ids) - 1)

    def _decode_text(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _require_ready(self) -> None:
        if self._failure is not None:
            raise EngineUnavailable(f"the engine failed and cannot recover ({self._failure}); restart the server")
        if self._closing:
            raise EngineUnavailable("engine is shutting down")
        if not self._ready:
            raise EngineUnavailable("engine is still loading the model; retry when health reports SERVING")


class EagerEngine(HFEngine):
    engine_name = "hf-eager"
    use_cache = False


class KVCacheEngine(HFEngine):
    engine_name = "hf-kv"
    use_cache = True


class FlashEngine(HFEngine):
    engine_name = "hf-flash"
    use_cache = True
    flash = True


def _put_threadsafe(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: object) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed under a late worker: nobody is listening
        loop.call_soon_threadsafe(queue.put_nowait, item)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineUnavailable("--device cuda was asked for but torch sees no CUDA device")
    return device


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 halves memory and doubles speed on GPUs; CPUs without AMX run it slower than float32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise InvalidRequest(f"unknown dtype {name!r}; choose auto, {', '.join(_DTYPES)}") from None


def _model_supports_sdpa(path) -> bool:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(path))]
    return bool(getattr(model_class, "_supports_sdpa", False))


def _eos_token_ids(model, tokenizer) -> frozenset[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(ids)


def _free_device_cache(device: torch.device) -> None:
    # Tensors caught in reference cycles would otherwise wait for the next collection and keep
    # their device blocks; an out-of-memory is rare enough to pay for a full collection.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
