"""The Hugging Face engine, configured three ways: no cache, KV cache, KV cache + flash attention.

One request per slot: each admitted request runs ``HFModel.generate`` (engines/hf/model.py)
in a worker thread of its own (torch releases the GIL inside its kernels); the event loop
only moves finished tokens to the consumer.  A closed stream sets the job's cancel flag,
and the worker stops before its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from engines import faults, memory, model_facts
from engines.admission import Admission
from engines.base import Engine, EngineInfo, EngineRequest, GenerationOutput, ScoreResult
from engines.errors import EngineOutOfMemory, EngineUnavailable
from engines.hf.model import HFModel, resolve_device, resolve_dtype
from engines.hf.static import parse_buckets
from engines.models import resolve_model
from engines.options import NoOptions, option

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HFOptions:
    compile: bool = option(
        False,
        "static KV cache and a compiled decode step (torch.compile; CUDA graphs on CUDA), compiled at start "
        "for each --compile-buckets length (README: when to use it)",
    )
    compile_buckets: str = option(
        "512,2048", "static-cache lengths (prompt + max_new_tokens) for --compile; longer requests run uncompiled"
    )

    def __post_init__(self) -> None:
        parse_buckets(self.compile_buckets)  # a bad list fails on the command line, not at the first request


@dataclass(eq=False)
class _Job:
    request: EngineRequest
    emit: Callable[[object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class HFEngine(Engine):
    """A transformers causal LM. Subclasses fix the cache and attention choices."""

    use_cache: bool = True
    flash: bool = False
    name = "hf"
    Options: ClassVar[type] = HFOptions  # hf-eager's is NoOptions
    offers_logprobs = True
    FaultInjection: ClassVar[type]  # the test-only mixin below

    def __init__(self, config) -> None:
        super().__init__(config)
        self._executor: ThreadPoolExecutor | None = None
        self._live_jobs: set[_Job] = set()
        self.lm: HFModel | None = None
        self.out_of_memory_count = 0

    # ---- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        # Loading, probing and decoding share the worker threads: torch's OpenMP pool then
        # belongs to the threads that use it, rather than a team per passing thread.
        self._slots = self.config.max_concurrency or 1
        self._executor = ThreadPoolExecutor(self._slots, thread_name_prefix=f"{self.name}-worker")
        self.lm = await asyncio.get_running_loop().run_in_executor(self._executor, self._load)
        compiled = self.lm.compiled
        log.info(
            "%s on %s: %s %s, attention kernel %s, use_cache=%s, decode %s",
            self.name,
            self.lm.device,
            self.config.model,
            self.lm.dtype_name,
            self.lm.attention,
            self.use_cache,
            f"compiled ({compiled.mode}) on static caches of {'/'.join(map(str, compiled.buckets))} tokens, "
            f"warm-up {compiled.warm_up_s:.1f} s"
            if compiled
            else "eager (dynamic cache)",
        )
        self._open(
            self.lm.tokenizer,
            self.lm.max_context,
            self.lm.vocab_size,
            Admission(self._slots, self.config.max_queue, self.config.max_queue_wait_s),
        )

    def _load(self) -> HFModel:
        from transformers import AutoConfig

        config = self.config
        path = resolve_model(config.model)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code).get_text_config()
        # Nothing is reserved up front (each request's cache grows with it), but one whole context must fit;
        # more slots at once are a load question, not a reason to refuse the model.
        kv = model_facts.kv_bytes_per_token(model_config, dtype) * model_facts.context_length(model_config)
        needed = memory.ensure_fits(config, path, dtype, device, kv)
        with memory.loading(f"{path.name} at {model_facts.dtype_name(dtype)} on {device}", needed):
            lm = self.load_model(config.model, config.dtype, config.device, config.trust_remote_code)
        if isinstance(self.options, HFOptions) and self.options.compile:  # hf-eager has no options
            lm.enable_compile(parse_buckets(self.options.compile_buckets))
        return lm

    @classmethod
    def load_model(
        cls, model: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False
    ) -> HFModel:
        """The model exactly as this engine runs it (cache and attention choices), without a server:
        for offline experiments that drive ``HFModel.generate`` themselves."""
        path = resolve_model(model)
        return HFModel.load(path, dtype, device, cls.use_cache, cls.flash, trust_remote_code)

    async def shutdown(self) -> None:
        await super().shutdown()
        for job in list(self._live_jobs):
            job.cancelled.set()
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    # ---- what the server asks ---------------------------------------------------------

    def info(self) -> EngineInfo:
        self._require_ready()
        lm = self._loaded(self.lm)
        return EngineInfo(
            engine=self.name,
            model=self.config.model,
            dtype=lm.dtype_name,
            device=str(lm.device),
            attention=lm.attention,
            use_cache=self.use_cache,
            max_context=lm.max_context,
            vocab_size=lm.vocab_size,
            max_concurrent_requests=self._slots,
            max_queue=self.config.max_queue,
            model_path=str(lm.path),
            custom_code=self.custom_code,
        )

    async def stream_tokens(self, request: EngineRequest):
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        job = _Job(request, emit=lambda item: _put_threadsafe(loop, outputs, item))
        self._live_jobs.add(job)
        worker = loop.run_in_executor(self._executor, self._decode, job)
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
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

    async def score_ids(self, ids: list[int]) -> ScoreResult:
        return await self._one_forward(self._loaded(self.lm).score_ids, ids)

    async def prompt_logprobs(self, request: EngineRequest):
        return await self._one_forward(
            self._loaded(self.lm).prompt_logprobs, request.prompt_ids, request.params.prompt_logprobs
        )

    async def _one_forward(self, function, *args):
        """A forward over a whole text in a worker thread (scoring), an out-of-memory reported as one."""
        out_of_memory = None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        except torch.OutOfMemoryError as exc:
            out_of_memory = f"device out of memory while scoring: {exc}".splitlines()[0]
        # Outside the except clause, as in _decode: the exception no longer pins the activations.
        self.out_of_memory_count += 1
        _free_device_cache(self.lm.device)
        raise EngineOutOfMemory(out_of_memory)

    # ---- worker-thread side -----------------------------------------------------------

    def _outputs(self, job: _Job) -> Generator[GenerationOutput, None, None]:
        return self._loaded(self.lm).generate(job.request.prompt_ids, job.request.params)

    def _decode(self, job: _Job) -> None:
        out_of_memory = None
        try:
            for output in self._outputs(job):
                if job.cancelled.is_set():
                    # Seen only if the consumer is still there, i.e. the engine is shutting down.
                    job.emit(
                        GenerationOutput(
                            text="",
                            token_ids=(),
                            prompt_tokens=output.prompt_tokens,
                            completion_tokens=output.completion_tokens - 1,
                            finish_reason="cancelled",
                        )
                    )
                    return
                job.emit(output)
        except torch.OutOfMemoryError as exc:
            out_of_memory = f"device out of memory while generating: {exc}".splitlines()[0]
        except torch.AcceleratorError as exc:
            # A CUDA error (illegal address, device-side assert) poisons the whole context: every
            # later kernel fails too, so the engine says it is done rather than fail each request.
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            self.fail(reason)
            log.error("device failed, engine stops serving: %s", reason)
            job.emit(EngineUnavailable(f"the device failed ({reason}); restart the server"))
        except BaseException as exc:  # handed to the consumer, which raises it in its own task
            log.exception("decode step failed")
            job.emit(exc)
        if out_of_memory is not None:
            # Freed only here, once the except clause has dropped the exception: its traceback held
            # the step's frames and with them this request's KV cache and activations.
            self.out_of_memory_count += 1
            _free_device_cache(self._loaded(self.lm).device)
            log.warning(
                "%s (out-of-memory events so far: %d); cache freed, serving on", out_of_memory, self.out_of_memory_count
            )
            job.emit(EngineOutOfMemory(out_of_memory))


# The mixin goes in front of an HFEngine subclass (faults.injecting): typed as one, plain object at run time.
if TYPE_CHECKING:
    _FaultBase = HFEngine
else:
    _FaultBase = object


class _HFFaultInjection(_FaultBase):
    """Test-only (engines/faults.py): each fault raised in the worker thread, where the real failure would be."""

    test_faults: tuple[faults.Fault, ...] = ()

    def _outputs(self, job: _Job) -> Generator[GenerationOutput, None, None]:
        fault = faults.match(self.test_faults, job.request.prompt)
        inner = super()._outputs(job)
        return inner if fault is None else self._failing_steps(inner, fault)

    def _failing_steps(self, inner: Generator[GenerationOutput, None, None], fault: faults.Fault):
        with contextlib.closing(inner):
            step = 0
            while True:
                if step == fault.step:
                    self._inject(fault)
                output = next(inner, None)
                if output is None:
                    return
                yield output
                step += 1

    def _inject(self, fault: faults.Fault) -> None:
        if fault.kind == "error":
            raise faults.InjectedFault(f"injected engine fault ({fault.marker})")
        if fault.kind == "fatal":
            raise torch.AcceleratorError(
                f"CUDA error: an illegal memory access was encountered (injected, {fault.marker})"
            )
        device = self._loaded(self.lm).device
        if device.type == "cuda":
            # A real out-of-memory: fill the device until its allocator refuses, so the check
            # that the memory comes back is a check of the real thing.
            blocks = []
            while True:
                blocks.append(torch.empty(2**30, dtype=torch.uint8, device=device))
        raise torch.OutOfMemoryError(f"CPU out of memory (injected, {fault.marker})")


HFEngine.FaultInjection = _HFFaultInjection


class EagerEngine(HFEngine):
    name = "hf-eager"
    use_cache = False
    Options = NoOptions  # the log's use_cache FALSE row stays as it is: no static cache to compile


class KVCacheEngine(HFEngine):
    name = "hf-kv"
    use_cache = True


class FlashEngine(HFEngine):
    name = "hf-flash"
    use_cache = True
    flash = True


def _put_threadsafe(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: object) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed under a late worker: nobody is listening
        loop.call_soon_threadsafe(queue.put_nowait, item)


def _free_device_cache(device: torch.device) -> None:
    # Tensors caught in reference cycles would otherwise wait for the next collection and keep
    # their device blocks; an out-of-memory is rare enough to pay for a full collection.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
