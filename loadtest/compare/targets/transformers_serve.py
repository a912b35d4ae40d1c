"""``transformers serve --continuous-batching`` beside our hf-cb rows: once with hf-cb's KV cache,
once left to its own defaults (capped to the memory that is free)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from loadtest.compare.targets.base import OutsideServerTarget


class TransformersServeTarget(OutsideServerTarget):
    """``transformers serve MODEL_DIR --continuous-batching``, beside our hf-cb rows, with hf-cb's KV
    cache (blocks, block size, tokens per step): left to itself on a CPU it sizes its cache from
    90 % of the machine's memory (``TransformersServeDefaultsTarget``).  It serves the model under
    its path and counts no tokens in Prometheus; its /v1/completions knows no ignore_eos, so its
    load honours EOS."""

    label = "transformers-serve-matched"
    name = "transformers serve --continuous-batching, hf-cb's KV cache"
    attention = "paged (transformers' default)"

    def __init__(self, model_path: str, dtype: str, log_path: Path, sample_period: float, extra_args: list[str]):
        import torch

        from engines.hf.model import resolve_dtype
        from engines.model_facts import dtype_name

        # Our "auto" (float32 on a CPU) named as transformers takes it; its own "auto" is the checkpoint's.
        dtype = dtype_name(resolve_dtype(dtype, torch.device("cpu")))
        super().__init__(model_path, model_path, dtype, log_path, sample_period)
        self.extra_args = extra_args

    def command(self) -> list[str]:
        from engines.hf_cb.engine import default_cache_plan

        plan = default_cache_plan(self.model_path, self.dtype)
        return [
            *self.serve_command(),
            "--cb-num-blocks",
            str(plan.num_blocks),
            "--cb-block-size",
            str(plan.block_size),
            "--cb-max-batch-tokens",
            str(plan.max_batch_tokens),
            *self.extra_args,
        ]

    def serve_command(self) -> list[str]:
        """``transformers serve`` with continuous batching on our port, in the run's dtype: no cache options."""
        return [
            str(Path(sys.executable).parent / "transformers"),
            "serve",
            self.model_path,
            "--continuous-batching",
            "--dtype",
            self.dtype,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]

    def env(self) -> dict[str, str]:
        return {**os.environ, "HF_HUB_OFFLINE": "1"}


# What transformers' continuous batching takes for its cache on a CPU when not told: this share of
# the machine's memory (less what the process holds), zeroed at start-up, so all of it resident.
TRANSFORMERS_DEFAULT_MEMORY_SHARE = 0.9
# Memory a comparison leaves to everything else on the machine when it has to cap that cache.
MEMORY_RESERVE_BYTES = 6 * 2**30
MEMORY_RESERVE_SHARE = 0.25


class TransformersServeDefaultsTarget(TransformersServeTarget):
    """``transformers serve MODEL_DIR --continuous-batching`` as a user starts it: the cache's blocks,
    block size and tokens per step are its own defaults (only the dtype is the run's, so the work is
    the same).  Its default cache on a CPU is 90 % of the machine's memory, zeroed at start: where
    that is more than is free, less a reserve for the rest of the machine, it is capped with
    ``--cb-max-memory-percent`` to what is free, and the row's note says so."""

    label = "transformers-serve-defaults"
    name = "transformers serve --continuous-batching, its own cache defaults"
    note = ""  # set by command() when the cache had to be capped

    def command(self) -> list[str]:
        self.note = ""
        cap: list[str] = []
        if not any(arg.startswith("--cb-max-memory-percent") for arg in self.extra_args):
            share = default_cache_share()
            if share is not None:
                cap = ["--cb-max-memory-percent", f"{share:.2f}"]
                self.note = (
                    f"cache capped at {share:.0%} of the machine's memory: its default, "
                    f"{TRANSFORMERS_DEFAULT_MEMORY_SHARE:.0%}, is more than is free"
                )
        return [*self.serve_command(), *cap, *self.extra_args]

    def start(self, timeout: float) -> dict:
        info = super().start(timeout)
        if self.note:
            info["note"] = self.note
        return info


def default_cache_share(available: int | None = None, total: int | None = None, held: int = 2**30) -> float | None:
    """None when transformers' default cache share fits in the memory free now, less the reserve
    (``held``: what its own process holds before the cache, which the default leaves out); else the
    share of the machine's memory that does fit.  Raises when not even 1 % does."""
    import psutil

    memory = psutil.virtual_memory()
    available = memory.available if available is None else available
    total = memory.total if total is None else total
    free = available - max(MEMORY_RESERVE_BYTES, MEMORY_RESERVE_SHARE * total) - held
    if TRANSFORMERS_DEFAULT_MEMORY_SHARE * (total - held) <= free:
        return None
    share = int(100 * free / total) / 100
    if share < 0.01:
        raise RuntimeError(
            f"transformers serve's default cache needs memory this machine does not have free: "
            f"{available / 2**30:.1f} GiB available"
        )
    return share
