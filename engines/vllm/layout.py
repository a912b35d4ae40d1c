"""How the vllm engine spreads one model over processes and machines, checked before vLLM starts.

vLLM splits a model two ways: tensor parallelism (TP) cuts every layer across ranks, pipeline
parallelism (PP) gives each rank a run of whole layers.  ``TP x PP`` ranks run as worker
processes of vLLM's multiprocess executor on this machine (``mp``) or as actors of a Ray
cluster that may span machines (``ray``).  A layout that cannot work is refused here, with
one line that says why, instead of deep in a child process's traceback minutes later.

Nothing here imports vLLM: the checks read the model's config (a transformers
``PretrainedConfig`` or anything with the same attributes) and plain numbers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from engines.errors import EngineUnavailable

log = logging.getLogger(__name__)

EXECUTORS = ("mp", "ray")
# vLLM's CPU backend reads this in the engine process it spawns, when it starts its workers.
BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    executor: str = "mp"

    @property
    def ranks(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def parallel(self) -> bool:
        return self.ranks > 1

    def describe(self) -> str:
        return f"TP {self.tensor_parallel} x PP {self.pipeline_parallel} over {self.executor}"


def check_layout(layout: Layout, model_config, *, device: str, enforce_eager: bool | None) -> None:
    """Refuses a layout vLLM could not run, before anything heavy starts."""
    if layout.executor not in EXECUTORS:
        raise EngineUnavailable(f"--distributed-executor-backend must be one of {', '.join(EXECUTORS)}")
    if layout.tensor_parallel < 1 or layout.pipeline_parallel < 1:
        raise EngineUnavailable("--tensor-parallel-size and --pipeline-parallel-size must be 1 or more")
    heads = int(getattr(model_config, "num_attention_heads", 0) or 0)
    if heads and heads % layout.tensor_parallel:
        raise EngineUnavailable(
            f"--tensor-parallel-size {layout.tensor_parallel} must divide the model's {heads} attention heads "
            f"(each rank takes an equal share); use a size among {_divisors(heads)}"
        )
    layers = int(getattr(model_config, "num_hidden_layers", 0) or 0)
    if layers and layout.pipeline_parallel > layers:
        raise EngineUnavailable(
            f"--pipeline-parallel-size {layout.pipeline_parallel} is more stages than the model's {layers} layers; "
            f"use {layers} or less"
        )
    if device == "cpu" and layout.pipeline_parallel > 1 and enforce_eager:
        # vLLM 0.32's CPUWorker skips its warm-up run when eager with an explicit KV-cache size
        # (cpu_worker.py, _should_warm_up_model), and that run is what allocates the buffers a later
        # pipeline stage receives into: the first request then fails an assertion in
        # gpu_model_runner.sync_and_gather_intermediate_tensors.
        raise EngineUnavailable(
            "--enforce-eager true with --pipeline-parallel-size > 1 fails on vLLM's CPU backend (its eager "
            "workers skip the warm-up that sizes the buffers between stages); leave --enforce-eager at auto"
        )


def check_cores(layout: Layout, cpus: Sequence[int]) -> None:
    """On a CPU each local rank needs at least one core of its own (the mp executor only)."""
    if layout.ranks > len(cpus):
        raise EngineUnavailable(
            f"TP {layout.tensor_parallel} x PP {layout.pipeline_parallel} = {layout.ranks} worker processes need "
            f"a CPU core each, and this process may use {len(cpus)} ({_ranges(cpus)}); lower the sizes, or run "
            f"the stages on more machines with --distributed-executor-backend ray"
        )


def thread_binding(cpus: Sequence[int], ranks: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``ranks`` workers on ``cpus``: equal contiguous shares, ``|``-separated.

    Cores left over (``len(cpus) % ranks``) stay unbound, for the server and vLLM's engine process.
    """
    if ranks < 1 or len(cpus) < ranks:
        raise ValueError(f"{ranks} ranks cannot each have a core of {len(cpus)}")
    ordered = sorted(cpus)
    share = len(ordered) // ranks
    return "|".join(_ranges(ordered[i * share : (i + 1) * share]) for i in range(ranks))


def allowed_cpus() -> list[int]:
    """The cores this process may run on (its affinity mask: a container's or taskset's limit)."""
    return sorted(os.sched_getaffinity(0))


def binding_for(layout: Layout, device: str) -> str | None:
    """The ``VLLM_CPU_OMP_THREADS_BIND`` this engine sets for vLLM's workers, or None to leave it be.

    vLLM's own default ("auto") gives each local rank a NUMA node of its own and stops at start-up
    when there are fewer nodes than ranks, which is every one-socket machine; one core share per
    rank serves instead.  For one rank, "auto" keeps a core per rank back for vLLM's scheduler
    process (``reserve_cpu_num``): on a 2-core machine the model then runs on one core.  The
    scheduler sleeps while the model runs, so the model gets every core instead: measured by
    ``make capacity`` against vLLM's own server left at "auto" and bound the same way
    (docs/results).  None where it does not apply (Ray's workers, a GPU) or where the user has
    set the variable (their binding stands).
    """
    if device != "cpu" or layout.executor != "mp":
        return None
    chosen = os.environ.get(BIND_ENV)
    if chosen:
        log.info("vllm: worker threads bound as %s=%s (set by the user)", BIND_ENV, chosen)
        return None
    cpus = allowed_cpus()
    check_cores(layout, cpus)
    binding = thread_binding(cpus, layout.ranks)
    log.info("vllm: %s, threads bound per rank %s=%s (set it to bind otherwise)", layout.describe(), BIND_ENV, binding)
    return binding


@contextlib.contextmanager
def bound_threads(binding: str | None) -> Iterator[None]:
    """``binding`` in the environment while vLLM spawns its processes, then removed again.

    vLLM's engine process reads it when it starts its workers, and a spawned process keeps the
    environment it was given; removing it afterwards lets a later engine in the same process
    (a test's) start with vLLM's default.
    """
    if binding is None:
        yield
        return
    os.environ[BIND_ENV] = binding
    try:
        yield
    finally:
        os.environ.pop(BIND_ENV, None)


def counted(n: int | float, noun: str, plural: str = "") -> str:
    """``2, "Ray node"`` -> ``"2 Ray nodes"``."""
    return f"{n:g} {noun if n == 1 else plural or noun + 's'}"


def _ranges(cpus: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (the list syntax vLLM parses)."""
    parts: list[str] = []
    ordered = sorted(cpus)
    start = prev = None
    for cpu in [*ordered, None]:
        if cpu is not None and prev is not None and cpu == prev + 1:
            prev = cpu
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = cpu
    return ",".join(parts)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
