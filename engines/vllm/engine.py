"""vLLM's asynchronous engine (V1 ``AsyncLLM``) behind the Engine interface.

vLLM batches continuously, pages its KV cache and runs the model in child processes;
this module only translates: our SamplingParams to vLLM's, vLLM's delta outputs to
GenerationOutput, its Logprob dicts to our entries (engines/logprobs.py: vLLM's default
``raw_logprobs`` is our convention), prompt logprobs to a score.  Closing the generator (client cancel,
disconnect, deadline) closes vLLM's own generator, which aborts the request inside the
engine core.  Its options (``VLLMOptions``) become the command line's vLLM flags.

vLLM is imported only inside the engine's methods: the command line reads this module for
its options, and must work, quickly, where vLLM is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from engines import memory, model_facts
from engines.admission import Admission
from engines.base import Engine, EngineInfo, EngineLoad, EngineRequest, GenerationOutput, ScoreResult
from engines.errors import EngineUnavailable, InvalidRequest
from engines.logprobs import TokenLogprob, TopLogprob
from engines.models import resolve_model
from engines.options import fields, flag, option, out_of_range
from engines.params import SamplingParams
from engines.vllm.layout import EXECUTORS, Layout, binding_for, bound_threads, check_layout, counted

if TYPE_CHECKING:
    from vllm.config.model import ModelDType
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

# vLLM serves up to the model's own context; past this the KV cache of one sequence would
# not fit the default CPU cache space (1 GiB) for the models here.
MAX_MODEL_LEN_CAP = 2048


@dataclass(frozen=True)
class VLLMOptions:
    max_model_len: int | None = option(
        None, f"context length vLLM serves (default: the model's, at most {MAX_MODEL_LEN_CAP})"
    )
    kv_cache_gb: float = option(1.0, "CPU: KV-cache space in GiB (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = option(0.9, "CUDA: share of GPU memory vLLM may take")
    # vLLM's own default: compiled. On a 2-core CPU SmolLM2-135M then starts in about 2 min
    # instead of 46 s and streams 26-41 % more tokens/s (README, --enforce-eager).
    enforce_eager: bool | None = option(
        None, "skip torch.compile and CUDA graphs: faster start, slower decoding (auto: vLLM's default, compiled)"
    )
    tensor_parallel_size: int = option(1, "ranks that split every layer (GPUs, or CPU worker processes)", minimum=1)
    pipeline_parallel_size: int = option(1, "pipeline stages, each a run of whole layers on its own rank", minimum=1)
    distributed_executor_backend: str = option(
        "mp",
        "where the TP x PP ranks run: mp, worker processes on this machine; ray, actors of the Ray cluster "
        "at RAY_ADDRESS (across machines)",
        choices=EXECUTORS,
    )
    ray_join_timeout_s: float = option(
        120.0,
        "ray: seconds to wait for the cluster to hold one device per rank before giving up",
        flag="ray-join-timeout",
        minimum=0,
    )

    def __post_init__(self) -> None:
        # The declared ranges, held on the command line (a ValueError there is one line) as on construction.
        for each in fields(VLLMOptions):
            why = out_of_range(VLLMOptions, each.name, getattr(self, each.name))
            if why:
                raise ValueError(f"{flag(each.name, VLLMOptions)} {why}")

    @property
    def layout(self) -> Layout:
        return Layout(self.tensor_parallel_size, self.pipeline_parallel_size, self.distributed_executor_backend)

    def max_model_len_for(self, model_limit: int) -> int:
        """The context served: the flag, else the model's own (``model_facts.context_length``) capped."""
        return self.max_model_len or min(MAX_MODEL_LEN_CAP, model_limit)


def _scheduler_view_class():
    """A stat logger that keeps the scheduler's latest running/waiting split and KV-cache usage.

    Made on first use: vLLM is imported only when the engine starts, so the command line and
    the hf-* engines never pay for it.
    """
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerView(StatLoggerBase):
        latest: tuple[int, int] = (0, 0)
        kv_cache_usage: float = 0.0

        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                cls = type(self)
                cls.latest = (scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs)
                cls.kv_cache_usage = float(getattr(scheduler_stats, "kv_cache_usage", 0.0) or 0.0)

        def log_engine_initialized(self) -> None:
            pass

    return SchedulerView


class VLLMEngine(Engine):
    name = "vllm"
    Options = VLLMOptions
    options: VLLMOptions  # Engine.__init__ checks that it is one
    requires = ("vllm",)
    offers_logprobs = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self._llm: AsyncLLM | None = None
        self._view: Any = None  # the SchedulerView class, made when the engine starts
        self._layout = ""  # the parallel layout as it runs; empty for one worker process

    # ---- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        from transformers import AutoConfig, AutoTokenizer

        options = self.options
        layout = options.layout
        self._path = await asyncio.to_thread(resolve_model, self.config.model)
        self._device = "cuda" if self._wants_cuda() else "cpu"
        self._dtype = (
            self.config.dtype if self.config.dtype != "auto" else ("bfloat16" if self._device == "cuda" else "float32")
        )
        trust = self.config.trust_remote_code
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self._path, trust_remote_code=trust)
        model_config = await asyncio.to_thread(AutoConfig.from_pretrained, self._path, trust_remote_code=trust)
        if self.custom_code:
            _check_transformers_backend(model_config, self._path)
        self._max_model_len = options.max_model_len_for(model_facts.context_length(model_config))
        check_layout(layout, model_config, device=self._device, enforce_eager=options.enforce_eager)
        if self._device == "cpu":
            self._check_kv_fits(model_config)
            # vLLM's CPU backend sizes its KV cache from this variable (GiB), read in the engine process.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{options.kv_cache_gb:g}"
        # On the CPU the KV cache is --kv-cache-gb of RAM; on CUDA vLLM sizes it from what the weights leave.
        kv = int(options.kv_cache_gb * 2**30) if self._device == "cpu" else 0
        needed = memory.ensure_fits(self.config, self._path, self._dtype, self._device, kv)
        binding = binding_for(layout, self._device)
        executor = await self._executor_backend(layout)

        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(self._path),
            tokenizer=str(self._path),
            trust_remote_code=trust,
            # One of the server's --dtype choices, or the auto rule's above: all names vLLM takes.
            dtype=cast("ModelDType", self._dtype),
            max_model_len=self._max_model_len,
            enforce_eager=bool(options.enforce_eager),
            max_num_seqs=self.config.max_concurrency,
            seed=0,
            tensor_parallel_size=options.tensor_parallel_size,
            pipeline_parallel_size=options.pipeline_parallel_size,
            distributed_executor_backend=executor,
            gpu_memory_utilization=options.gpu_memory_utilization,
            disable_log_stats=False,
        )
        # Lets collective_rpc carry the small functions that ask the workers for their attention
        # backend and where they run: to this process's own children, or over Ray to the cluster's
        # actors, whose nodes run whatever the cluster is given anyway (Ray has no authentication here).
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        self._view = _scheduler_view_class()
        try:
            with bound_threads(binding), memory.loading(f"{self._path.name} into vLLM on {self._device}", needed):
                self._llm = AsyncLLM.from_engine_args(args, stat_loggers=[self._view])
        except Exception as exc:
            raise EngineUnavailable(
                f"vLLM engine failed to start ({type(exc).__name__}: {exc}); the lines above from EngineCore say why"
            ) from exc
        vllm_config = self._llm.vllm_config
        cache = vllm_config.cache_config
        self._kv_cache_tokens = int((cache.num_gpu_blocks or 0) * cache.block_size)
        self._max_num_seqs = vllm_config.scheduler_config.max_num_seqs
        self._attention = await self._attention_backend()
        self._layout = await self._placement(layout, binding)
        log.info(
            "vllm on %s: %s %s, attention %s, KV cache %d tokens, up to %d sequences at once%s",
            self._device,
            self.config.model,
            self._dtype,
            self._attention,
            self._kv_cache_tokens,
            self._max_num_seqs,
            f"; {self._layout}" if self._layout else "",
        )
        self._open(
            tokenizer,
            self._max_model_len,
            int(model_config.vocab_size),
            Admission(self._max_num_seqs, self.config.max_queue, self.config.max_queue_wait_s),
        )

    def _wants_cuda(self) -> bool:
        if self.config.device != "auto":
            return self.config.device.startswith("cuda")
        from vllm.platforms import current_platform

        return current_platform.is_cuda()

    async def _executor_backend(self, layout: Layout):
        """vLLM's ``distributed_executor_backend`` for the layout, once the Ray cluster (if any) is ready for it."""
        if layout.executor == "mp":
            # One rank: vLLM's own choice (on CUDA the worker in its engine process); more: its worker processes.
            return "mp" if layout.parallel else None
        from engines.vllm import ray_cluster as vllm_ray

        vllm_ray.check_installed()
        resource = "GPU" if self._device == "cuda" else "CPU"
        cluster = await asyncio.to_thread(
            vllm_ray.wait_for_cluster, layout.ranks, resource, self.options.ray_join_timeout_s
        )
        if cluster is not None:
            log.info("vllm: %s; %s", cluster.describe(), layout.describe())
        from engines.vllm import ray_executor as vllm_ray_executor

        if vllm_ray_executor.version_supported():
            return vllm_ray_executor.CPURayExecutor if self._device == "cpu" else vllm_ray_executor.RayExecutor
        if self._device == "cuda":
            log.warning(
                "vllm: engines/vllm/ray_executor.py was checked against vLLM %sx only, so vLLM's own Ray executor "
                "runs: a stage that dies on another node may leave calls waiting for their deadlines",
                vllm_ray_executor.CHECKED_VERSION,
            )
            return "ray"
        raise EngineUnavailable(
            "--distributed-executor-backend ray on a CPU runs through engines/vllm/ray_executor.py, checked against "
            f"vLLM {vllm_ray_executor.CHECKED_VERSION}x only; use mp, or check that module against this vLLM"
        )

    def _check_kv_fits(self, model_config) -> None:
        """Says what vLLM would only say deep in a child process's traceback."""
        per_token = model_facts.kv_bytes_per_token(model_config, self._dtype)
        needed_gb = per_token * self._max_model_len / 2**30
        kv_cache_gb = self.options.kv_cache_gb
        if needed_gb > kv_cache_gb:
            fits = int(kv_cache_gb * 2**30 // per_token)
            raise EngineUnavailable(
                f"--max-model-len {self._max_model_len} needs {needed_gb:.2f} GiB of KV cache for one sequence but "
                f"--kv-cache-gb is {kv_cache_gb:g}; raise --kv-cache-gb or use --max-model-len {fits} or less"
            )

    async def _attention_backend(self) -> str:
        def backend_names(worker) -> list[str]:
            names = set()
            for module in worker.model_runner.model.modules():
                backend = getattr(module, "attn_backend", None)
                if backend is not None:
                    names.add(backend.get_name())
            return sorted(names)

        try:
            # AsyncLLM.collective_rpc is annotated for a method name, but the engine core it hands to takes a callable.
            per_worker = await self._loaded(self._llm).collective_rpc(backend_names)  # type: ignore[arg-type]
            return "vllm paged attention: " + ", ".join(sorted({n for names in per_worker for n in names}))
        except Exception as exc:  # a diagnostic, not worth failing start-up over
            log.warning("could not ask vLLM's workers for their attention backend: %s", exc)
            return "vllm paged attention (backend not reported)"

    async def _placement(self, layout: Layout, binding: str | None) -> str:
        """The layout as it really runs, from the workers themselves: ranks, processes, machines or Ray nodes."""
        if not layout.parallel and layout.executor == "mp":
            return ""

        def where(worker) -> tuple[int, int, str]:
            import os
            import socket

            node = socket.gethostname()
            try:
                import ray

                if ray.is_initialized():
                    node = "ray:" + ray.get_runtime_context().get_node_id()
            except ImportError:
                pass
            return (int(worker.rank), os.getpid(), node)

        try:
            # As in _attention_backend: the engine core takes a callable where the annotation says a name.
            ranks = await self._loaded(self._llm).collective_rpc(where)  # type: ignore[arg-type]
        except Exception as exc:  # a diagnostic, as the attention backend
            log.warning("could not ask vLLM's workers where they run: %s", exc)
            return layout.describe()
        processes = len({(node, pid) for _, pid, node in ranks})
        nodes = {node for _, _, node in ranks}
        kind = "Ray node" if all(node.startswith("ray:") for node in nodes) else "machine"
        text = (
            f"{layout.describe()}: {counted(len(ranks), 'rank')} in {counted(processes, 'process', 'processes')} "
            f"on {counted(len(nodes), kind)}"
        )
        return text + (f", threads bound {binding}" if binding else "")

    async def shutdown(self) -> None:
        await super().shutdown()
        if self._llm is not None:
            await asyncio.to_thread(self._llm.shutdown)
            self._llm = None

    # ---- what the server asks ---------------------------------------------------------

    def info(self) -> EngineInfo:
        self._require_ready()
        return EngineInfo(
            engine=self.name,
            model=self.config.model,
            dtype=self._dtype,
            device=self._device,
            # The parallel layout rides in this free-text field (GetModelInfo's and yayi_engine_info's):
            # both fix their fields, and it says what really runs, as the kernel does.
            attention=f"{self._attention}; {self._layout}" if self._layout else self._attention,
            use_cache=True,
            max_context=self._max_model_len,
            vocab_size=self._vocab_size,
            max_concurrent_requests=self._max_num_seqs,
            max_queue=self.config.max_queue,
            model_path=str(self._path),
            kv_cache_tokens=self._kv_cache_tokens,
            kv_cache_bytes=int(self.options.kv_cache_gb * 2**30) if self._device == "cpu" else 0,
            custom_code=self.custom_code,
        )

    @property
    def failure(self) -> str | None:
        """A recorded failure, or vLLM's engine core found dead (it is vLLM's process; a read, nothing recorded)."""
        if super().failure is None and self._llm is not None and self._llm.errored:
            return f"the vLLM engine has died ({self._llm.dead_error})"
        return super().failure

    def load(self) -> EngineLoad:
        if self._llm is None:
            return EngineLoad(running=0, waiting=0)
        # The frontend's count is exact at once (an abort drops it immediately); the scheduler's
        # split arrives with its next step, so it only apportions that count.
        unfinished = self._llm.get_num_unfinished_requests()
        waiting = min(self._view.latest[1], unfinished)
        # An idle engine holds no blocks, whatever the last step reported.
        usage = self._view.kv_cache_usage if unfinished else 0.0
        # Requests still waiting for an admission slot have not reached vLLM yet, but they wait all the same.
        queued = self._admission.waiting if self._admission is not None else 0
        return EngineLoad(running=unfinished - waiting, waiting=waiting + queued, kv_cache_usage=usage)

    def check_params(self, params: SamplingParams) -> None:
        _to_vllm(params)

    def score_context(self) -> int:
        # One position is kept free: vLLM must generate a token even when only scoring.
        return self._max_model_len - 1

    async def stream_tokens(self, request: EngineRequest):
        from vllm.inputs import TokensPrompt

        stream = self._loaded(self._llm).generate(
            TokensPrompt(prompt_token_ids=list(request.prompt_ids)), _to_vllm(request.params), request.request_id
        )
        params = request.params
        completion = 0
        first = True
        async with contextlib.aclosing(stream), _engine_death_as_unavailable():
            async for output in stream:
                sequence = output.outputs[0]
                completion += len(sequence.token_ids)
                finish = _finish_reason(sequence, request.params) if output.finished else None
                text = sequence.text.rstrip("\ufffd") if finish else sequence.text
                entries: tuple[TokenLogprob, ...] = ()
                if params.logprobs is not None:
                    # In delta mode vLLM hands over the new tokens' entries only, one per token.
                    entries = _entries(sequence.token_ids, sequence.logprobs or (), params.logprobs)
                prompt_logprobs = None
                if first and params.prompt_logprobs is not None:
                    k = params.prompt_logprobs
                    prompt_logprobs = _prompt_entries(request.prompt_ids, output.prompt_logprobs, k)
                yield GenerationOutput(
                    text=text,
                    token_ids=tuple(sequence.token_ids),
                    prompt_tokens=len(request.prompt_ids),
                    completion_tokens=completion,
                    finish_reason=finish,
                    started_at=_scheduled_at(output) if first else None,
                    logprobs=entries,
                    prompt_logprobs=prompt_logprobs,
                )
                first = False

    async def prompt_logprobs(self, request: EngineRequest):
        from vllm.inputs import TokensPrompt

        k = request.params.prompt_logprobs
        assert k is not None  # the request path asks for these only when the request did
        # vLLM always generates a token (max_tokens 0 is refused); it is dropped here.
        params = _to_vllm(request.params)
        final = None
        async with _engine_death_as_unavailable():
            async for output in self._loaded(self._llm).generate(
                TokensPrompt(prompt_token_ids=list(request.prompt_ids)), params, request.request_id
            ):
                final = output
        return _prompt_entries(request.prompt_ids, None if final is None else final.prompt_logprobs, k)

    async def score_ids(self, ids: list[int]) -> ScoreResult:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = VllmSamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY
        )
        final = None
        async with _engine_death_as_unavailable():
            async for output in self._loaded(self._llm).generate(
                TokensPrompt(prompt_token_ids=ids), params, f"score-{uuid.uuid4().hex}"
            ):
                final = output
        if final is None or final.prompt_logprobs is None:
            raise RuntimeError("vLLM returned no prompt log-probabilities for a text to score")
        # Entry i holds the logprob of prompt token i given the ones before it; the first has none.
        total = sum(entry.logprob for entry in _entries(ids[1:], final.prompt_logprobs[1:], 0))
        return ScoreResult(total_logprob=float(total), token_count=len(ids) - 1)


@contextlib.asynccontextmanager
async def _engine_death_as_unavailable():
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        yield
    except EngineDeadError as exc:
        raise EngineUnavailable(f"the vLLM engine process died ({exc}); restart the server") from exc


def _to_vllm(params: SamplingParams):
    try:
        return _vllm_params(params)
    except Exception as exc:
        # Our checks mirror vLLM's, but a vLLM release may add its own: the client's mistake
        # must still read as one (INVALID_ARGUMENT), not as a server bug.
        raise InvalidRequest(f"vLLM refused the sampling parameters: {exc}") from exc


def _vllm_params(params: SamplingParams):
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    scoring_only = params.max_new_tokens == 0
    return VllmSamplingParams(
        # Scoring only: vLLM must still generate one token, which nobody reads.
        max_tokens=params.max_new_tokens or 1,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        repetition_penalty=params.repetition_penalty,
        stop=list(params.stop) or None,
        # vLLM adds the folder's generation_config.json end-of-sequence ids to these itself.
        stop_token_ids=list(params.stop_token_ids) or None,
        seed=params.seed,
        ignore_eos=params.ignore_eos,
        output_kind=RequestOutputKind.FINAL_ONLY if scoring_only else RequestOutputKind.DELTA,
        skip_special_tokens=True,
        include_stop_str_in_output=False,
        logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
    )


def _entries(token_ids, positions, k: int) -> tuple[TokenLogprob, ...]:
    """vLLM's per-position Logprob dicts (the token there, and the top ``k`` by rank) to our entries.

    Texts stay empty: the request path fills them the same way for every engine.
    """
    if len(positions) != len(token_ids):
        raise RuntimeError(f"vLLM returned {len(positions)} log-probability positions for {len(token_ids)} tokens")
    entries = []
    for token, by_id in zip(token_ids, positions, strict=True):
        # Ranks start at 1; the token itself is an extra entry when it is not among the top k.
        ranked = sorted(
            (item for item in by_id.items() if item[1].rank is not None and item[1].rank <= k),
            key=lambda item: (item[1].rank, -item[1].logprob),
        )[:k]
        top = tuple(TopLogprob(token_id=int(i), text="", logprob=float(lp.logprob)) for i, lp in ranked)
        entries.append(TokenLogprob(token_id=int(token), text="", logprob=float(by_id[token].logprob), top=top))
    return tuple(entries)


def _prompt_entries(prompt_ids, positions, k: int) -> tuple[TokenLogprob | None, ...]:
    """vLLM's prompt logprobs: the first position is None, as ours."""
    if positions is None or len(positions) != len(prompt_ids):
        raise RuntimeError("vLLM returned no prompt log-probabilities for a request that asked for them")
    return (None, *_entries(prompt_ids[1:], positions[1:], k))


def _check_transformers_backend(model_config, path) -> None:
    """A model of its own code runs in vLLM through its Transformers backend, unless vLLM has the architecture
    itself; that backend builds the base model with ``AutoModel``, which the folder's auto_map must then name."""
    from vllm.model_executor.models import ModelRegistry

    architectures = getattr(model_config, "architectures", None) or []
    if any(name in ModelRegistry.get_supported_archs() for name in architectures):
        return
    if "AutoModel" not in (getattr(model_config, "auto_map", None) or {}):
        raise EngineUnavailable(
            f"vLLM runs {', '.join(architectures) or 'this model'} from {path} through its Transformers backend, "
            "which builds the base model with AutoModel, and config.json's auto_map names none: add "
            '"AutoModel": "<modeling file>.<base model class>" to it, or serve the folder with hf-kv or hf-cb'
        )


def _finish_reason(sequence, params: SamplingParams) -> str:
    # vLLM says "stop" for EOS, a stop string and a stop id alike; stop_reason tells them apart.
    if sequence.finish_reason == "stop":
        asked = isinstance(sequence.stop_reason, str) or sequence.stop_reason in params.stop_token_ids
        return "stop" if asked else "eos"
    if sequence.finish_reason == "abort":
        return "cancelled"
    return sequence.finish_reason or "length"


def _scheduled_at(output) -> float | None:
    # Engine-core timestamps are time.monotonic() in another process: the same clock on Linux.
    stats = getattr(output, "metrics", None)
    scheduled = getattr(stats, "scheduled_ts", 0.0)
    return scheduled or None
