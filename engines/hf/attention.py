"""Which attention implementation to ask transformers for, and which kernel really ran.

Asking for "sdpa" does not guarantee PyTorch's flash kernel: SDPA silently falls back
to its math kernel when a shape, dtype or device does not fit.  So the flash engine
forces the flash backend while it runs, and at start-up a short forward pass under a
dispatch recorder notes the attention operator that actually executed.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch

# Profiler operator names that identify an attention kernel, most specific first.
_KERNEL_OPS = (
    ("flash_attn", "flash-attn package"),
    ("_scaled_dot_product_flash_attention_for_cpu", "sdpa-flash (cpu)"),
    ("_scaled_dot_product_flash_attention", "sdpa-flash"),
    ("_flash_attention_forward", "sdpa-flash"),
    ("_scaled_dot_product_cudnn_attention", "sdpa-cudnn"),
    ("_scaled_dot_product_efficient_attention", "sdpa-mem-efficient"),
    ("_efficient_attention_forward", "sdpa-mem-efficient"),
    ("_scaled_dot_product_attention_math", "sdpa-math"),
    ("scaled_dot_product_attention", "sdpa (backend not seen)"),
)


def flash_attn_package_usable(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None


def requested_implementation(flash: bool, device: torch.device, model_supports_sdpa: bool) -> str:
    if not flash:
        return "eager"
    if flash_attn_package_usable(device):
        return "flash_attention_2"
    return "sdpa" if model_supports_sdpa else "eager"


def kernel_context(implementation: str):
    """Restrict SDPA to its flash kernel so a fallback raises instead of passing unnoticed."""
    if implementation != "sdpa":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def observed_kernel(run_forward) -> str:
    """Runs ``run_forward()`` and names the attention kernel it dispatched to.

    A dispatch mode sees every ATen operator after SDPA has picked its backend, so the
    name recorded is the kernel that ran, not the one asked for.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class OperatorRecorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            if func is torch.ops.aten.scaled_dot_product_attention.default:
                # SDPA is a composite op: decomposing it with the recorder active lets the
                # backend kernel it chooses pass through the recorder too.
                with self:
                    result = func.decompose(*args, **(kwargs or {}))
                if result is not NotImplemented:
                    return result
            return func(*args, **(kwargs or {}))

    with OperatorRecorder() as recorder:
        run_forward()
    for fragment, label in _KERNEL_OPS:
        matches = sorted(name for name in recorder.names if fragment in name)
        if matches:
            return f"{label}: {matches[0]}"
    return "eager: matmul + softmax"
