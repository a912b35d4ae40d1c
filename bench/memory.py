"""Peak memory of one call, the same way on a CPU and on CUDA.

A CPU has no allocator statistics like ``torch.cuda.max_memory_allocated``, and the
process's resident size hides what the allocator reuses, so on a CPU the profiler's
allocation events (every tensor a kernel allocates or frees, scratch buffers included)
are replayed in order and their running total's high-water mark taken.
"""

from __future__ import annotations

import torch


def peak_bytes(fn, device: torch.device | str = "cpu") -> int:
    """Bytes allocated beyond what was live before ``fn()``, at its high-water mark."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def tensor_bytes(*objects) -> int:
    """Bytes held by the tensors inside (a KV cache's layers, lists, tuples)."""
    seen: set[int] = set()
    total = 0

    def visit(obj, depth=0):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if obj.data_ptr() not in seen:
                seen.add(obj.data_ptr())
                total += obj.untyped_storage().nbytes()
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
        elif depth < 3 and hasattr(obj, "__dict__"):
            for item in vars(obj).values():
                visit(item, depth + 1)

    for obj in objects:
        visit(obj)
    return total


def peak_bytes_with_cache(cache, fn, device: torch.device | str = "cpu") -> int:
    """Peak bytes of ``fn()`` (a decode step) counting the KV cache it holds and grows.

    On a CPU the profiler cannot see blocks allocated before it started being freed, so a
    step that replaces each layer's cache by a longer copy would look like it adds a whole
    second cache.  The cache is therefore copied inside the measurement first: its bytes
    are counted once, and the old blocks' release is seen.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return tensor_bytes(cache.layers) + peak_bytes(fn, device)

    def run():
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
        fn()

    return peak_bytes(run, device)
