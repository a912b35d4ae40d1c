"""The model side of engine ``hf-cb``: one model under transformers' continuous-batching manager.

Free of asyncio: ``CBRuntime.build`` runs in a worker thread at start-up and returns the
manager already running (its own thread), with the facts the engine reports.  Three
things here are ours rather than the library's defaults:

- the KV-cache size is bounded by us (transformers sizes it from free device memory:
  about 120 GiB of an H200), and never below one full-context sequence, because a
  request the cache can never hold stops the manager's loop for every request;
- the kernel that really ran is observed on a probe request through the manager;
- Score gets its own model object, sharing the weight tensors: once the manager has
  switched a model to paged attention, a plain forward on it is not causal
  (transformers #48296).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engines import model_facts
from engines.errors import EngineUnavailable
from engines.hf import attention as hf_attention
from engines.hf import compat as transformers_compat
from engines.hf.model import HFModel, eos_token_ids, load_causal_lm, model_supports_sdpa, resolve_device, resolve_dtype
from engines.models import resolve_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from transformers.generation.continuous_batching.cache import PagedAttentionCache
    from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager

    from engines.hf_cb.sampling import SamplerTable

log = logging.getLogger(__name__)

# Auto-sized KV cache: a byte budget, never more tokens than this, never less than one full context.
AUTO_KV_CACHE_BYTES = {"cpu": 1 * 2**30, "cuda": 8 * 2**30}
AUTO_KV_CACHE_MAX_TOKENS = 2**17
AUTO_MAX_BATCH_TOKENS = {"cpu": 1024, "cuda": 8192}
_PROBE_PROMPT = "The attention kernel probe"
_PROBE_TIMEOUT_S = 300


@dataclass(frozen=True)
class CachePlan:
    num_blocks: int
    block_size: int
    max_batch_tokens: int

    def manager_config(self, graphs: bool, max_running: int | None = None):
        """transformers' ContinuousBatchingConfig for this cache (the engine's and bench/hf_cb_batch.py's)."""
        from transformers import ContinuousBatchingConfig

        return ContinuousBatchingConfig(
            page_size=self.block_size,
            num_blocks=self.num_blocks,
            max_batch_tokens=self.max_batch_tokens,
            use_cuda_graph=graphs,
            # We choose the kernel; the manager's own switch may fetch flash kernels from the Hub.
            auto_switch_to_flash=False,
            max_requests_per_batch=max_running,  # None: the manager's own bound
        )


def plan_cache(
    text_config,
    dtype: torch.dtype,
    device: torch.device,
    num_blocks: int | None,
    block_size: int,
    max_batch_tokens: int | None,
    max_running: int,
) -> CachePlan:
    kind = "cuda" if device.type == "cuda" else "cpu"
    context = model_facts.context_length(text_config)
    if num_blocks is None:
        per_token = model_facts.kv_bytes_per_token(text_config, dtype)
        tokens = min(AUTO_KV_CACHE_BYTES[kind] // per_token, max_running * context, AUTO_KV_CACHE_MAX_TOKENS)
        num_blocks = math.ceil(max(tokens, context) / block_size)
    return CachePlan(num_blocks, block_size, max_batch_tokens or AUTO_MAX_BATCH_TOKENS[kind])


@dataclass
class CBRuntime:
    """A running manager, its model, the scoring model beside it, and what they are."""

    path: Path
    model: PreTrainedModel  # the manager's model: paged attention, never for a plain forward
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    manager: ContinuousBatchingManager
    cache: PagedAttentionCache  # the manager's
    scorer: HFModel  # the same weights, plain attention
    samplers: SamplerTable | None  # None with CUDA graphs (greedy only)
    eos_ids: tuple[int, ...]
    graphs: bool
    implementation: str
    block_size: int
    num_blocks: int
    max_batch_tokens: int
    kv_cache_bytes: int
    max_context: int
    vocab_size: int
    kernel: str = "not probed"

    # ---- building ------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model_name: str,
        dtype_name: str,
        device_name: str,
        options,
        max_running: int,
        trust_remote_code: bool = False,
    ) -> CBRuntime:
        from transformers import AutoTokenizer, GenerationConfig

        from engines.hf_cb import sampling as hf_cb_sampling

        path = resolve_model(model_name)
        device = resolve_device(device_name)
        dtype = resolve_dtype(dtype_name, device)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        implementation = paged_implementation(path, device, trust_remote_code)
        model = load_causal_lm(path, dtype, device, implementation, trust_remote_code)
        # Before the manager touches the model: the scorer keeps plain (eager) attention, as hf-kv scores.
        scorer = HFModel(
            path,
            _shared_weights_copy(model, "eager"),
            tokenizer,
            device,
            dtype,
            use_cache=False,
            implementation="eager",
        )
        eos_ids = sorted(eos_token_ids(model, tokenizer))

        graphs = bool(options.cuda_graphs) and device.type == "cuda"
        if options.cuda_graphs and not graphs:
            log.warning("--cuda-graphs true ignored: CUDA graphs need a CUDA device")
        plan = plan_cache(
            model.config.get_text_config(),
            dtype,
            device,
            options.num_blocks,
            options.block_size,
            options.max_batch_tokens,
            max_running,
        )
        cb_config = plan.manager_config(graphs, max_running)
        # Greedy by default; EOS is given per request, so ignore_eos can drop it.
        generation_config = GenerationConfig(
            do_sample=False,
            eos_token_id=eos_ids or -1,
            pad_token_id=getattr(model.generation_config, "pad_token_id", None),
        )
        manager = model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=cb_config
        )
        samplers = None
        if not graphs:
            # A graph cannot hold Python sampling per request; without graphs every field is honoured.
            samplers = hf_cb_sampling.SamplerTable(device)
            manager.logit_processor = hf_cb_sampling.processor_list(samplers)
        manager.warmup()  # creates the cache now (and captures graphs when they are on)
        assert manager.batch_processor is not None  # warmup() has just built it
        cache = manager.batch_processor.cache
        runtime = cls(
            path=path,
            model=model,
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
            manager=manager,
            cache=cache,
            scorer=scorer,
            samplers=samplers,
            eos_ids=tuple(eos_ids),
            graphs=graphs,
            implementation=transformers_compat.attn_implementation(model.config),
            block_size=plan.block_size,
            num_blocks=int(cache.num_blocks),
            max_batch_tokens=int(cache.max_batch_tokens),
            kv_cache_bytes=int(cache.cache_tensor.numel() * cache.cache_tensor.element_size()),
            max_context=min(scorer.max_context, _longest_request(cache)),
            vocab_size=scorer.vocab_size,
        )
        manager.start()
        runtime.probe()
        return runtime

    def probe(self) -> None:
        """Runs a first request through the started manager and names the attention operator it ran."""
        try:
            if self.graphs:
                # A graph replay runs no Python forward to watch, and a recorder inside a capture could spoil it.
                self.kernel = "not observed under CUDA graphs"
                self._first_request()
            else:
                self.kernel = self._probe_kernel()
        except BaseException:
            self.stop()  # its thread is not a daemon: left running, the process could never exit
            raise

    def _probe_kernel(self) -> str:
        """Sends one short request through the manager and names the attention operator its forward ran.

        The forward runs in the manager's thread, so the recorder goes around the model's
        forward there, for this request only.
        """
        seen: dict[str, str] = {}
        original = self.model.forward

        def recording_forward(*args, **kwargs):
            result = {}

            def run():
                result["output"] = original(*args, **kwargs)

            seen["kernel"] = hf_attention.observed_kernel(run)
            return result["output"]

        self.model.forward = recording_forward
        try:
            self._first_request()
        finally:
            del self.model.forward  # back to the class's forward
        return seen.get("kernel", "not observed")

    def _first_request(self) -> None:
        """One short request through the running manager; raises if it does not come back."""
        ids = self.tokenizer(_PROBE_PROMPT).input_ids
        request_id = self.manager.add_request(ids, request_id="yayi-first-request", max_new_tokens=2, eos_token_id=-1)
        deadline = time.monotonic() + _PROBE_TIMEOUT_S
        while time.monotonic() < deadline:
            result = self.manager.get_result(request_id=request_id, timeout=1)
            if result is not None and result.is_finished():
                if result.error is not None:
                    raise EngineUnavailable(f"the continuous-batching manager failed its first request: {result.error}")
                return
            self.raise_if_dead()
        raise EngineUnavailable(f"the continuous-batching manager gave no token in {_PROBE_TIMEOUT_S} s")

    # ---- what the engine reads -----------------------------------------------------------

    @property
    def attention(self) -> str:
        return (
            f"paged|{self.implementation.removeprefix('paged|')}: {self.kernel}; KV cache {self.num_blocks} "
            f"blocks x {self.block_size} tokens" + ("; CUDA graphs" if self.graphs else "")
        )

    @property
    def fatal_error(self) -> BaseException | None:
        return self.manager.background_thread_status.fatal_error

    def loop_failed(self) -> bool:
        """Whether the loop is failing or has failed for good.

        The manager stops itself (hard stop) before it fails the requests it holds and
        records the error only after, so a request's failure can arrive before the error.
        """
        status = self.manager.background_thread_status
        return status.fatal_error is not None or status.local_status >= status.HARD_STOP

    def raise_if_dead(self) -> None:
        if self.fatal_error is not None:
            raise EngineUnavailable(f"the continuous-batching loop failed: {self.fatal_error}")
        if not self.manager.is_running():
            raise EngineUnavailable("the continuous-batching loop has stopped")

    def counts(self) -> tuple[int, int]:
        """(running, waiting) inside the manager: scheduled requests, then queued and not yet scheduled ones."""
        processor = self.manager.batch_processor
        queued = self.manager.input_queue.qsize()
        if processor is None:
            return 0, queued
        scheduler = processor.scheduler
        return len(scheduler.active_requests), len(scheduler.waiting_requests) + queued

    def kv_cache_usage(self) -> float:
        """Blocks held by live requests over all blocks, 0..1.

        Blocks that only keep a finished prompt's prefix for reuse do not count: the
        manager hands them out again whenever it needs room, as vLLM counts its own.
        """
        used = total = 0
        for allocator in self.cache.cache_allocators.values():
            blocks: set[int] = set()
            # list() copies the values in one step under the GIL; the manager's thread edits the dict.
            for table in list(allocator.block_table.values()):
                blocks.update(table)
            used += len(blocks) * allocator.bytes_per_block
            total += allocator.num_blocks * allocator.bytes_per_block
        return min(1.0, used / total) if total else 0.0

    def drop_stray_outputs(self) -> None:
        """Empties the manager's shared output queue, which nobody here reads.

        Outputs go there for a request without a handler: a cancelled request's handler is
        dropped at once, and the step already under way may still deliver it one output.
        """
        stray = self.manager.output_router.output_queue
        while not stray.empty():
            stray.get_nowait()

    def stop(self) -> None:
        """Stops the loop now; requests still inside are failed, and their consumers told."""
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=30, hard_stop=True)
        self.manager.destroy()


def paged_implementation(path: Path, device: torch.device, trust_remote_code: bool = False) -> str:
    """The paged attention kernel: flash-attn on CUDA when installed, else SDPA, else eager."""
    if hf_attention.flash_attn_package_usable(device):
        return "flash_attention_2"
    return "sdpa" if model_supports_sdpa(path, trust_remote_code) else "eager"


def _shared_weights_copy(model, implementation: str):
    """A second model object over the same weight tensors, with its own config and attention."""
    memo = {id(parameter): parameter for parameter in model.parameters()}
    twin = copy.deepcopy(model, memo)
    twin.set_attn_implementation(implementation)
    return twin


def _longest_request(cache) -> int:
    """The longest prompt plus completion one request can have on an empty cache."""
    from transformers.generation.continuous_batching.model_runner import infer_max_single_request_tokens

    return infer_max_single_request_tokens(cache)
