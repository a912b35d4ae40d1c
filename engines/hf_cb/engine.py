"""Engine ``hf-cb``: transformers' continuous batching with paged attention behind our Engine.

Many requests share each forward pass.  The scheduler, the paged KV cache and the loop
that runs the model are transformers' own (``ContinuousBatchingManager``, in its own
thread; engines/hf_cb/runtime.py builds it).  This module only translates: a request
goes in with ``add_request``, the manager's per-step snapshots come back through a
result handler on the event loop (the manager calls it with ``call_soon_threadsafe``),
and become whole-character text with our detokenizer and stop strings.  Closing the
stream cancels the request inside the manager, which frees its blocks at its next step.

Sampling fields the manager cannot do per request are done by our logits processor
(engines/hf_cb/sampling.py), and so are the generated tokens' log-probabilities; stop
strings are ours, here.  The prompt's log-probabilities come from one forward of the
scoring model beside the manager (the one Score uses): the manager computes logits only
where a token is to be generated.  A request for them and one new token (lm-eval's scoring
requests: echo, max_tokens 1) is served by that forward alone, whose last position gives
the new token, rather than by it and a second prefill of the same prompt in the manager.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engines import memory, model_facts
from engines.admission import Admission
from engines.base import Engine, EngineInfo, EngineLoad, EngineRequest, GenerationOutput, ScoreResult
from engines.completion import Completion
from engines.errors import EngineOutOfMemory, EngineUnavailable, InvalidRequest
from engines.hf import compat as transformers_compat
from engines.logprobs import TokenLogprob
from engines.model_facts import dtype_name
from engines.options import option
from engines.params import SamplingParams

if TYPE_CHECKING:
    from engines.hf_cb.runtime import CBRuntime

log = logging.getLogger(__name__)

DEFAULT_MAX_RUNNING = {"cpu": 32, "cuda": 256}


@dataclass(frozen=True)
class CBOptions:
    num_blocks: int | None = option(
        None,
        "KV-cache blocks (default: what fits 1 GiB on CPU, 8 GiB on CUDA, and "
        "never less than one full-context request)",
    )
    block_size: int = option(256, "tokens per KV-cache block (transformers' page_size)")
    max_batch_tokens: int | None = option(
        None, "tokens one forward pass may take, prefill chunks included (default: 1024 on CPU, 8192 on CUDA)"
    )
    torch_threads: int = option(
        0, "CPU: torch's threads for the model (0: torch's own default, one per core)", minimum=0
    )
    cuda_graphs: bool | None = option(
        None,
        "CUDA: replay CUDA graphs; greedy requests only, since per-request "
        "sampling runs in Python, which a graph cannot hold (auto: off)",
    )


def default_cache_plan(
    model: str, dtype: str, device: str = "cpu", max_running: int | None = None, trust_remote_code: bool = False
):
    """The KV cache hf-cb builds with its default options, for a peer (transformers serve, generate_batch)
    that is to get the same."""
    from transformers import AutoConfig

    from engines.hf.model import resolve_device, resolve_dtype
    from engines.hf_cb.runtime import plan_cache
    from engines.models import resolve_model

    where = resolve_device(device)
    options = CBOptions()
    return plan_cache(
        AutoConfig.from_pretrained(resolve_model(model), trust_remote_code=trust_remote_code).get_text_config(),
        resolve_dtype(dtype, where),
        where,
        options.num_blocks,
        options.block_size,
        options.max_batch_tokens,
        max_running or DEFAULT_MAX_RUNNING["cuda" if where.type == "cuda" else "cpu"],
    )


class ContinuousBatchingEngine(Engine):
    name = "hf-cb"
    Options = CBOptions
    options: CBOptions  # Engine.__init__ checks that it is one
    offers_logprobs = True
    # With --engine-process the manager's loop shares no GIL with the front ends (vLLM's EngineCore shape).
    runs_in_child_process = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self._runtime: CBRuntime | None = None
        self._request_numbers = itertools.count()
        self._score_lock: asyncio.Lock | None = None

    # ---- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        from engines.hf.model import resolve_device
        from engines.hf_cb.runtime import CBRuntime

        if self.options.block_size < 4:
            raise EngineUnavailable(f"--block-size must be at least 4 tokens, got {self.options.block_size}")
        device = resolve_device(self.config.device)
        kind = "cuda" if device.type == "cuda" else "cpu"
        self._max_running = self.config.max_concurrency or DEFAULT_MAX_RUNNING[kind]
        self._score_lock = asyncio.Lock()
        if self.options.torch_threads and kind == "cpu":
            import torch

            # Process-wide: the manager's thread and the scorer's take their pools' size from it.
            torch.set_num_threads(self.options.torch_threads)
        path, needed = await asyncio.to_thread(self._check_memory)
        started = time.perf_counter()
        log.info("hf-cb: loading %s (%s)...", path.name, memory.size(needed) if needed else "size unknown")
        runtime = await _in_passing_thread(
            CBRuntime.build,
            self.config.model,
            self.config.dtype,
            self.config.device,
            self.options,
            self._max_running,
            self.config.trust_remote_code,
        )
        log.info("hf-cb: loaded %s in %.1f s", path.name, time.perf_counter() - started)
        self._runtime = runtime
        log.info(
            "hf-cb on %s: %s %s, attention %s, up to %d requests at once, %d tokens per step, context %d%s",
            runtime.device,
            self.config.model,
            dtype_name(runtime.dtype),
            runtime.attention,
            self._max_running,
            runtime.max_batch_tokens,
            runtime.max_context,
            f", {_torch_threads()} torch threads" if runtime.device.type == "cpu" else "",
        )
        self._open(
            runtime.tokenizer,
            runtime.max_context,
            runtime.vocab_size,
            Admission(self._max_running, self.config.max_queue, self.config.max_queue_wait_s),
        )

    def _check_memory(self):
        """The weights and the paged KV cache this engine will allocate, against what is free (engines/memory.py)."""
        from transformers import AutoConfig

        from engines.hf.model import resolve_device, resolve_dtype
        from engines.hf_cb.runtime import plan_cache
        from engines.models import resolve_model

        path = resolve_model(self.config.model)
        device = resolve_device(self.config.device)
        dtype = resolve_dtype(self.config.dtype, device)
        text_config = AutoConfig.from_pretrained(
            path, trust_remote_code=self.config.trust_remote_code
        ).get_text_config()
        options = self.options
        plan = plan_cache(
            text_config,
            dtype,
            device,
            options.num_blocks,
            options.block_size,
            options.max_batch_tokens,
            self._max_running,
        )
        kv = plan.num_blocks * plan.block_size * model_facts.kv_bytes_per_token(text_config, dtype)
        return path, memory.ensure_fits(self.config, path, dtype, device, kv)

    async def shutdown(self) -> None:
        await super().shutdown()
        if self._runtime is not None:
            await asyncio.to_thread(self._runtime.stop)

    # ---- what the server asks ---------------------------------------------------------

    def info(self) -> EngineInfo:
        self._require_ready()
        runtime = self._loaded(self._runtime)
        return EngineInfo(
            engine=self.name,
            model=self.config.model,
            dtype=dtype_name(runtime.dtype),
            device=str(runtime.device),
            attention=runtime.attention,
            use_cache=True,
            max_context=runtime.max_context,
            vocab_size=runtime.vocab_size,
            max_concurrent_requests=self._max_running,
            max_queue=self.config.max_queue,
            model_path=str(runtime.path),
            kv_cache_tokens=runtime.num_blocks * runtime.block_size,
            kv_cache_bytes=runtime.kv_cache_bytes,
            custom_code=self.custom_code,
        )

    def load(self) -> EngineLoad:
        if self._runtime is None or self._admission is None:
            return EngineLoad(running=0, waiting=0)
        running, waiting = self._runtime.counts()
        # Requests still waiting for an admission slot have not reached the manager yet.
        return EngineLoad(
            running=running, waiting=waiting + self._admission.waiting, kv_cache_usage=self._runtime.kv_cache_usage()
        )

    @property
    def failure(self) -> str | None:
        """A recorded failure, or the manager's loop found stopped: it runs in a thread of transformers',
        which can die while no request is there to see it (a read, nothing recorded)."""
        runtime = self._runtime
        if super().failure is None and runtime is not None and not self._closing:
            if runtime.fatal_error is not None or not runtime.manager.is_running():
                return f"the continuous-batching loop stopped ({runtime.fatal_error})"
        return super().failure

    def check_params(self, params: SamplingParams) -> None:
        if self._runtime is None or self._runtime.samplers is not None:
            return
        if params.logprobs is not None:
            raise InvalidRequest(
                "logprobs are not available on this server: hf-cb runs with --cuda-graphs true, and the "
                "log-probabilities are taken in its per-request logits processor, which a graph cannot run",
                field="logprobs",
            )
        # With CUDA graphs only the manager's greedy argmax runs: refuse what it would ignore.
        if not params.greedy:
            raise InvalidRequest(
                "temperature must be 0 (greedy) on this server: hf-cb runs with --cuda-graphs "
                "true, which samples greedily only"
            )
        if params.repetition_penalty != 1.0:
            raise InvalidRequest(
                "repetition_penalty must be 1 on this server: hf-cb runs with --cuda-graphs true, which cannot apply it"
            )

    # ---- generation ---------------------------------------------------------------------

    async def stream_tokens(self, request: EngineRequest):
        from engines.hf_cb.sampling import SAMPLER_KWARG, needs_sampler

        runtime = self._loaded(self._runtime)
        manager = runtime.manager
        params = request.params
        if params.prompt_logprobs is not None and params.max_new_tokens == 1:
            for output in await self._scoring_forward(_one_token, runtime.scorer, request):
                yield output
            return
        # The client's id may repeat once its request is over; the manager's must not while it lives.
        request_id = f"{request.request_id}#{next(self._request_numbers)}"
        snapshots: asyncio.Queue = asyncio.Queue()
        sampler_key = sampler = None
        extra: dict[str, Any] = {}  # add_request's logit-processor keywords
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            prompt_logprobs = await self.prompt_logprobs(request)
        if runtime.samplers is not None and needs_sampler(params):
            sampler_key = runtime.samplers.add(request.prompt_ids, params)
            sampler = runtime.samplers.get(sampler_key)
            extra[SAMPLER_KWARG] = sampler_key
        done_inside = False
        runtime.drop_stray_outputs()
        manager.register_result_handler(request_id, snapshots.put_nowait)
        try:
            added = manager.add_request(
                list(request.prompt_ids),
                request_id=request_id,
                max_new_tokens=params.max_new_tokens,
                streaming=True,
                eos_token_id=_ending_ids(params, runtime.eos_ids),
                **extra,
            )
            if added is None:
                runtime.raise_if_dead()
                raise EngineUnavailable("the continuous-batching manager is not accepting requests")
            text = _TextStream(runtime, request, sampler)
            while True:
                snapshot = await self._next_snapshot(snapshots)
                done_inside = snapshot.is_finished()
                if snapshot.error is not None:
                    if self._closing:  # the manager was stopped under this request by shutdown
                        yield text.cancelled()
                        return
                    raise self._failed(snapshot.error)
                output = text.advance(snapshot.generated_tokens, done_inside)
                if output is None:
                    continue
                if output.completion_tokens == len(output.token_ids):  # the first output of this request
                    output = dataclasses.replace(
                        output, started_at=_monotonic(snapshot.lifespan[0]), prompt_logprobs=prompt_logprobs
                    )
                yield output
                if output.finish_reason is not None:
                    return
        finally:
            # Completion, a stop string, an error, or the consumer gone (cancel, deadline, disconnect).
            if not done_inside:
                manager.cancel_request(request_id)
                transformers_compat.drop_result_handler(manager, request_id)
            if runtime.samplers is not None:
                runtime.samplers.remove(sampler_key)

    async def _next_snapshot(self, snapshots: asyncio.Queue):
        """The newest snapshot of the request: the manager's carry every token so far, so a backlog collapses."""
        while True:
            try:
                async with asyncio.timeout(_LIVENESS_CHECK_S):  # no task per token, unlike wait_for
                    snapshot = await snapshots.get()
            except TimeoutError:
                # The loop fails requests it holds when it dies; this catches a thread gone without a word.
                if not self._closing:
                    self._loaded(self._runtime).raise_if_dead()
                continue
            while not snapshots.empty() and snapshot.error is None and not snapshot.is_finished():
                snapshot = snapshots.get_nowait()
            return snapshot

    def _failed(self, error: str) -> Exception:
        if not self._loaded(self._runtime).loop_failed():
            return RuntimeError(f"hf-cb request failed inside the manager: {error}")
        reason = f"the continuous-batching loop failed: {error}"
        self.fail(reason)
        log.error("%s; the engine stops serving", reason)
        if "out of memory" in error.lower():
            return EngineOutOfMemory(f"device out of memory while generating: {error}")
        return EngineUnavailable(f"{reason}; restart the server")

    # ---- scoring ------------------------------------------------------------------------

    async def score_ids(self, ids: list[int]) -> ScoreResult:
        return await self._scoring_forward(self._loaded(self._runtime).scorer.score_ids, ids)

    async def prompt_logprobs(self, request: EngineRequest):
        scorer = self._loaded(self._runtime).scorer
        return await self._scoring_forward(scorer.prompt_logprobs, request.prompt_ids, request.params.prompt_logprobs)

    async def _scoring_forward(self, function, *args):
        import torch

        try:
            async with self._score_lock:  # one at a time, as the hf engines score
                return await _in_passing_thread(function, *args)
        except torch.OutOfMemoryError as exc:
            raise EngineOutOfMemory(f"device out of memory while scoring: {exc}".splitlines()[0]) from None


_LIVENESS_CHECK_S = 1.0


def _one_token(scorer, request: EngineRequest) -> list[GenerationOutput]:
    """The prompt's log-probabilities and one new token from the scorer's one forward over the prompt
    (its generate samples the last position's logits as hf-kv does, the request's sampling and all)."""
    return list(scorer.generate(request.prompt_ids, request.params))


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


async def _in_passing_thread(function, *args):
    """``function(*args)`` on a thread that ends with it.

    Every thread that runs torch on a CPU keeps its own OpenMP pool of workers for as long as
    it lives.  Once there are more such threads than cores, libgomp stops letting idle
    workers spin, and the manager's forward passes, which hand work to their pool many times
    a step, wait on every wake-up: with the start-up thread kept alive, SmolLM2 ran at 1.3x
    the time per step on this 2-core machine, using 1.3 cores instead of 2.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="hf-cb-passing") as thread:
        return await asyncio.get_running_loop().run_in_executor(thread, function, *args)


def _ending_ids(params: SamplingParams, eos_ids) -> list[int] | int:
    """The ids the manager ends the request at: the model's EOS (unless ignored) and the request's stop ids."""
    ids = sorted(set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids)))
    return ids or -1


class _TextStream:
    """A request's token snapshots to outputs: whole characters, stop strings, finish reasons, usage."""

    def __init__(self, runtime, request: EngineRequest, sampler=None) -> None:
        self.params = request.params
        self.sampler = sampler  # holds the generated tokens' log-probabilities when they were asked for
        self.completion = Completion(
            lambda ids: runtime.tokenizer.decode(ids, skip_special_tokens=True),
            self.params,
            runtime.eos_ids,
            len(request.prompt_ids),
        )

    def advance(self, tokens: list[int], finished: bool) -> GenerationOutput | None:
        """The output for the tokens not seen yet, or None when there are none."""
        first = self.completion.completion_tokens
        new = tokens[first:]
        if not new:
            return None
        pieces, taken, finish = [], [], None
        for index, token in enumerate(new):
            taken.append(token)
            # A finished snapshot's last token ends the request, whatever the bound: its ending reads as length.
            text, finish = self.completion.add(token, last=finished and index == len(new) - 1)
            pieces.append(text)
            if finish is not None:
                break
        entries: tuple[TokenLogprob, ...] = ()
        if self.params.logprobs is not None:
            entries = tuple(self.sampler.logprobs[first : self.completion.completion_tokens])
            if [entry.token_id for entry in entries] != taken:
                # The processor's record and the manager's tokens disagree: no values rather than wrong ones.
                raise RuntimeError(f"hf-cb: log-probabilities recorded for {entries} do not match tokens {taken}")
        return self.completion.output("".join(pieces), tuple(taken), finish, entries)

    def cancelled(self) -> GenerationOutput:
        return self.completion.output("", (), "cancelled")


def _monotonic(perf_counter_time: float) -> float | None:
    """The manager stamps with time.perf_counter(); GenerationOutput.started_at is time.monotonic()."""
    if perf_counter_time is None or perf_counter_time < 0:
        return None
    return time.monotonic() - (time.perf_counter() - perf_counter_time)
