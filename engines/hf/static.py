"""``--compile`` for hf-kv and hf-flash: a static KV cache and a compiled decode step.

With transformers' dynamic cache every decode step is a fresh graph of small kernels
launched from Python; on a GPU that launch overhead, not the device, bounds batch-1
speed.  A ``StaticCache`` has fixed shapes, so the one-token decode step compiles once
(``torch.compile``; mode "reduce-overhead" on CUDA, i.e. CUDA graphs) and replays.

Shapes must stay fixed, so caches come in a few lengths ("buckets"): a request takes the
smallest bucket that holds its prompt and ``max_new_tokens``; each bucket's graph is
compiled at start-up (warm-up), never on a request's time.  A request longer than the
largest bucket runs on the uncompiled dynamic-cache path and the log says so.  The
prefill (the whole prompt at once, a new shape each time) stays uncompiled.  Caches are
kept and reused (reset between requests) because CUDA graphs replay on fixed addresses.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

log = logging.getLogger(__name__)

WARM_UP_PROMPT_TOKENS = 8
WARM_UP_NEW_TOKENS = 3


def parse_buckets(text: str) -> tuple[int, ...]:
    try:
        buckets = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise ValueError(f"--compile-buckets takes comma-separated lengths, got {text!r}") from None
    if not buckets or buckets[0] < WARM_UP_PROMPT_TOKENS + WARM_UP_NEW_TOKENS:
        raise ValueError(f"--compile-buckets needs lengths of at least {WARM_UP_PROMPT_TOKENS + WARM_UP_NEW_TOKENS}")
    return buckets


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process so far: a rise after warm-up is a recompile."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


class StaticDecoder:
    """Owns the compiled step and a pool of static caches per bucket for one model."""

    def __init__(self, model, device: torch.device, max_context: int, buckets: tuple[int, ...]) -> None:
        from transformers import StaticCache

        self._model = model
        self._make_cache = lambda length: StaticCache(config=model.config, max_cache_len=length)
        self.device = device
        self.buckets = tuple(b for b in buckets if b <= max_context) or (max_context,)
        self.mode = "reduce-overhead" if device.type == "cuda" else "default"
        self._step = torch.compile(self._decode_step, mode=self.mode, dynamic=False, fullgraph=False)
        self._free: dict[int, list] = {bucket: [] for bucket in self.buckets}
        self._lock = threading.Lock()
        self._warm = False  # true once warm-up has compiled every bucket: later compiles are recompiles
        self.recompiles = 0
        self.warm_up_s = 0.0

    def _decode_step(self, input_ids: torch.Tensor, cache_position: torch.Tensor, cache) -> torch.Tensor:
        out = self._model(
            input_ids=input_ids, past_key_values=cache, cache_position=cache_position, use_cache=True, logits_to_keep=1
        )
        return out.logits[0, -1].float()

    def bucket_for(self, length: int) -> int | None:
        return next((bucket for bucket in self.buckets if bucket >= length), None)

    def acquire(self, length: int):
        """A cache (reset by its first step) of the smallest bucket holding ``length`` tokens, or None if none does."""
        bucket = self.bucket_for(length)
        if bucket is None:
            return None
        with self._lock:
            free = self._free[bucket]
            lease = free.pop() if free else None
        return lease if lease is not None else _Lease(self, bucket, self._make_cache(bucket))

    def release(self, lease: _Lease) -> None:
        with self._lock:
            self._free[lease.bucket].append(lease)

    def warm_up(self, run_one) -> None:
        """Compiles every bucket's step now: ``run_one(length)`` runs one short request whose
        prompt and new tokens need ``length`` positions."""
        started = time.perf_counter()
        for bucket in self.buckets:
            run_one(bucket)
        self.warm_up_s = time.perf_counter() - started
        self._warm = True
        log.info(
            "compiled decode (%s) for static caches of %s tokens in %.1f s",
            self.mode,
            "/".join(map(str, self.buckets)),
            self.warm_up_s,
        )

    def step(self, token: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
        """The compiled decode step; a graph compiled during it after warm-up is a recompile, counted and logged.

        Counted around this decoder's own calls, so another compiled model in the process is not blamed on it.
        """
        before = compiled_graph_count()
        logits = self._step(token, position, cache)
        if self._warm and compiled_graph_count() != before:
            self.recompiles += 1
            log.warning(
                "the compiled decode step recompiled on a request (%d recompiles so far); "
                "a shape or guard changed after warm-up",
                self.recompiles,
            )
        return logits


class _Lease:
    """A static cache with the step's input buffers, lent to one request at a time.

    The step always reads the same (1, 1) token and (1,) position tensors: a view into each
    request's id buffer would have another stride per request, and that is a recompile.
    """

    def __init__(self, decoder: StaticDecoder, bucket: int, cache) -> None:
        self.decoder = decoder
        self.bucket = bucket
        self.cache = cache
        self._token = torch.zeros((1, 1), dtype=torch.long, device=decoder.device)
        self._position = torch.zeros(1, dtype=torch.long, device=decoder.device)

    def first(self, model, ids: torch.Tensor, n_prompt: int, keep: dict) -> torch.Tensor:
        """The prefill: the logits of the positions ``keep`` keeps (the last one, or all), as the model gave them."""
        self.cache.reset()
        positions = torch.arange(n_prompt, device=self.decoder.device)
        out = model(
            input_ids=ids[None, :n_prompt],
            past_key_values=self.cache,
            cache_position=positions,
            use_cache=True,
            **keep,
        )
        return out.logits[0]

    def next(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        """Logits after the ``n``-th token (its id already in ``ids[n - 1]``)."""
        self._token.copy_(ids[n - 1 : n].view(1, 1))  # device to device
        self._position.fill_(n - 1)  # in place: no host-to-device copy per token
        return self.decoder.step(self._token, self._position, self.cache)
