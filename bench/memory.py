"""Peak memory of one call, the same way on a CPU and on CUDA.

A CPU has no allocator statistics like ``torch.cuda.max_memory_allocated``, and the
process's resident size hides what the allocator reuses, so on a CPU the profiler's
allocation events (every block a kernel allocates or frees, scratch buffers included,
with its address) are replayed in order and their running total's high-water mark taken.
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
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size))
        stack.extend(node.children)
    # Only blocks allocated inside the measurement count, and only their own release: a block
    # from before may come back with a stale size (the allocator reuses addresses) or none.
    sizes: dict[int, int] = {}
    live = peak = 0
    for _, ptr, size in sorted(events, key=lambda event: event[0]):
        if size > 0:
            sizes[ptr] = size
            live += size
        elif ptr in sizes:
            live -= sizes.pop(ptr)
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

    On a CPU only blocks allocated inside the measurement are counted (see ``peak_bytes``),
    so the cache, built before it, is copied inside it first: its bytes are then counted
    once, and the copies' release as the step grows them is seen.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return tensor_bytes(cache.layers) + peak_bytes(fn, device)

    def run():
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
        fn()

    return peak_bytes(run, device)
