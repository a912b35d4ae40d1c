"""Roofline bounds for transformer inference: what a device can do at best for a model shape.

Decode (one new token per sequence per step) reads every weight once per step plus each
sequence's KV cache, so at small batches it is bound by memory bandwidth; prefill pushes
a whole prompt through each weight at once and is bound by FLOP/s.  The bounds ignore
everything a real engine adds (kernel launches, sampling, Python), so a measured figure
is always below them and "% of bound" says how much of the hardware an engine uses.

Counting conventions (one place, so tests and reports agree):
- ``params`` counts every weight stored, the way model cards do.
- A decoded token streams the *matmul* weights: all but an untied input embedding, of
  which a step reads only one row per token.  Tied embeddings are read in full, as the
  output projection.
- FLOPs per token: 2 per matmul weight, plus attention's 4 x layers x context x
  (heads x head_dim) for the scores and the weighted sum; prefill's causal attention
  costs half of the full square.

This is the model; yayi-compare's "% of bound" column (loadtest/measure/roofline_column.py) and
the bench/ experiments both use it.  ``python -m bench.roofline`` prints the bounds for the
shapes under ``bench/shapes``; ``python -m bench.roofline_measure`` measures beside them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from engines import model_facts
from loadtest.measure.machine import cpu_name


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float  # FLOP/s at the serving dtype (dense, no sparsity)
    bandwidth: float  # bytes/s of the memory that holds the weights
    memory_bytes: float
    source: str


# NVIDIA datasheet figures, dense bf16 tensor-core FLOP/s (the datasheets print twice as
# much "with sparsity", which inference on dense weights never sees).
DEVICES: dict[str, Device] = {
    # NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf):
    # A100 80GB SXM, BF16 Tensor Core 312 TFLOPS, GPU memory bandwidth 2,039 GB/s, 80 GB HBM2e.
    "a100-80g": Device(
        "A100-80G SXM", 312e12, 2039e9, 80e9, "NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense, 2039 GB/s, 80 GB (SXM)"
    ),
    # NVIDIA H100 Tensor Core GPU datasheet: H100 SXM, BF16 Tensor Core 1,979 TFLOPS with
    # sparsity (989 dense), GPU memory bandwidth 3.35 TB/s, 80 GB HBM3.
    "h100": Device(
        "H100 SXM", 989e12, 3.35e12, 80e9, "NVIDIA H100 datasheet: 989 TFLOP/s bf16 dense, 3.35 TB/s, 80 GB (SXM)"
    ),
    # NVIDIA H200 Tensor Core GPU datasheet: H200 SXM, BF16 Tensor Core 1,979 TFLOPS with
    # sparsity (989 dense), GPU memory bandwidth 4.8 TB/s, 141 GB HBM3e.
    "h200": Device(
        "H200 SXM", 989e12, 4.8e12, 141e9, "NVIDIA H200 datasheet: 989 TFLOP/s bf16 dense, 4.8 TB/s, 141 GB (SXM)"
    ),
}


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    vocab: int
    intermediate: int | None
    source: str
    head_dim: int | None = None  # None: hidden // heads
    architecture: str = "llama"  # "llama" (gated MLP, RMSNorm, RoPE) or "bloom" (plain MLP, LayerNorm, ALiBi)
    positions: str = "rope"
    tie_embeddings: bool = False
    max_context: int = model_facts.DEFAULT_CONTEXT
    reported_params: int | None = None  # what the model card says, to check the count against
    notes: str = field(default="", compare=False)

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def streamed_params(self) -> int:
        """Weights a decode step reads in full: all but an untied input embedding."""
        return self.params - (0 if self.tie_embeddings else self.vocab * self.hidden)


def count_params(
    architecture: str,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    intermediate: int | None,
    tie_embeddings: bool,
    head_dim: int | None = None,
) -> int:
    """Stored weights of a Llama-style or BLOOM-style decoder, biases and norms included."""
    head_dim = head_dim or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    embed = vocab * hidden
    if architecture == "bloom":
        intermediate = intermediate or 4 * hidden
        # fused qkv and dense with biases, plain two-matrix MLP with biases, two LayerNorms
        attention = hidden * (q + 2 * kv) + (q + 2 * kv) + q * hidden + hidden
        mlp = 2 * hidden * intermediate + intermediate + hidden
        per_layer = attention + mlp + 4 * hidden
        # the embedding LayerNorm and the final one
        extra = 4 * hidden
    elif architecture == "llama":
        if intermediate is None:
            raise ValueError("a llama-style shape needs its intermediate (MLP) size")
        attention = hidden * (q + 2 * kv) + q * hidden
        mlp = 3 * hidden * intermediate  # gate, up, down
        per_layer = attention + mlp + 2 * hidden  # two RMSNorms
        extra = hidden
    else:
        raise ValueError(f"unknown architecture {architecture!r}: llama or bloom")
    return embed * (1 if tie_embeddings else 2) + layers * per_layer + extra


def make_shape(
    name: str,
    *,
    layers: int,
    hidden: int,
    heads: int,
    vocab: int,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    architecture: str = "llama",
    tie_embeddings: bool = False,
    head_dim: int | None = None,
    source: str = "",
    **extra,
) -> ModelShape:
    kv_heads = kv_heads or heads
    if architecture == "bloom":
        intermediate = intermediate or 4 * hidden
    params = count_params(architecture, layers, hidden, heads, kv_heads, vocab, intermediate, tie_embeddings, head_dim)
    extra.setdefault("positions", "alibi" if architecture == "bloom" else "rope")
    return ModelShape(
        name=name,
        params=params,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        vocab=vocab,
        intermediate=intermediate,
        source=source,
        head_dim=head_dim,
        architecture=architecture,
        tie_embeddings=tie_embeddings,
        **extra,
    )


def shape_from_hf_config(path_or_dict, name: str | None = None) -> ModelShape:
    """A shape from a Hugging Face ``config.json`` (a folder, the file, or its dict): llama-like or bloom."""
    if isinstance(path_or_dict, dict):
        config, origin = path_or_dict, "config dict"
    else:
        path = Path(path_or_dict)
        if path.is_dir():
            path = path / "config.json"
        config, origin = json.loads(path.read_text()), str(path)
    model_type = config.get("model_type", "llama")
    name = name or config.get("_name_or_path") or model_type
    if model_type == "bloom":
        hidden = config.get("hidden_size") or config["n_embed"]
        return make_shape(
            name,
            layers=config["n_layer"],
            hidden=hidden,
            heads=config["n_head"],
            vocab=config["vocab_size"],
            architecture="bloom",
            tie_embeddings=config.get("tie_word_embeddings", True),
            max_context=model_facts.context_length(config, ("max_position_embeddings", "seq_length")),
            source=origin,
        )
    heads = config["num_attention_heads"]
    return make_shape(
        name,
        layers=config["num_hidden_layers"],
        hidden=config["hidden_size"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        vocab=config["vocab_size"],
        intermediate=config["intermediate_size"],
        head_dim=config.get("head_dim"),
        tie_embeddings=config.get("tie_word_embeddings", False),
        max_context=model_facts.context_length(config),
        source=origin,
    )


# ---- the bounds ----------------------------------------------------------------------


def kv_bytes_per_token(shape: ModelShape, bytes_per_value: float = 2) -> float:
    """Keys and values of one token in every layer."""
    return 2 * shape.layers * shape.kv_heads * shape.dim_head * bytes_per_value


def _kv_cache_bytes(shape: ModelShape, batch: int, tokens: int, per_param: float, per_kv_value: float | None) -> float:
    # Unless told otherwise the cache is held at the weights' precision.
    kv_value = per_param if per_kv_value is None else per_kv_value
    return batch * tokens * kv_bytes_per_token(shape, kv_value)


def memory_bytes(
    shape: ModelShape,
    batch: int = 1,
    context: int = 0,
    bytes_per_param: float = 2,
    kv_bytes_per_value: float | None = None,
) -> float:
    """Weights plus a KV cache holding ``context`` tokens for each of ``batch`` sequences."""
    return shape.params * bytes_per_param + _kv_cache_bytes(shape, batch, context, bytes_per_param, kv_bytes_per_value)


def decode_flops_per_token(shape: ModelShape, context: int = 0) -> float:
    return 2 * shape.streamed_params + 4 * shape.layers * context * shape.heads * shape.dim_head


def decode_step_bytes(
    shape: ModelShape,
    batch: int = 1,
    context: int = 0,
    bytes_per_param: float = 2,
    kv_bytes_per_value: float | None = None,
) -> float:
    kv_bytes = _kv_cache_bytes(shape, batch, context, bytes_per_param, kv_bytes_per_value)
    return shape.streamed_params * bytes_per_param + kv_bytes


def decode_bound_tokens_per_s(
    shape: ModelShape,
    device: Device,
    batch: int = 1,
    context: int = 0,
    bytes_per_param: float = 2,
    kv_bytes_per_value: float | None = None,
) -> float:
    """Tokens/s summed over the batch, each sequence holding ``context`` tokens of cache."""
    step_bytes = decode_step_bytes(shape, batch, context, bytes_per_param, kv_bytes_per_value)
    memory_bound = device.bandwidth / step_bytes * batch
    compute_bound = device.peak_flops / decode_flops_per_token(shape, context)
    return min(memory_bound, compute_bound)


def prefill_flops(shape: ModelShape, prompt: int) -> float:
    """One prompt of ``prompt`` tokens: the matmuls for every token plus causal attention."""
    return 2 * shape.streamed_params * prompt + 2 * shape.layers * prompt * prompt * shape.heads * shape.dim_head


def prefill_bound_tokens_per_s(
    shape: ModelShape,
    device: Device,
    batch: int = 1,
    prompt: int = 512,
    bytes_per_param: float = 2,
    kv_bytes_per_value: float | None = None,
) -> float:
    """Prompt tokens/s over the batch: FLOP-bound unless the prompt is short enough to be bandwidth-bound."""
    flops = batch * prefill_flops(shape, prompt)
    # A decode step's traffic with the prompt as its context: the weights once, the prompts' cache written.
    moved = decode_step_bytes(shape, batch, prompt, bytes_per_param, kv_bytes_per_value)
    seconds = max(flops / device.peak_flops, moved / device.bandwidth)
    return batch * prompt / seconds


def bound_kind(shape: ModelShape, device: Device, batch: int = 1, context: int = 0, bytes_per_param: float = 2) -> str:
    """Which roof the decode bound sits under: "memory" or "compute"."""
    memory_bound = device.bandwidth / decode_step_bytes(shape, batch, context, bytes_per_param) * batch
    return "memory" if memory_bound <= device.peak_flops / decode_flops_per_token(shape, context) else "compute"


def fits(shape: ModelShape, device: Device, batch: int = 1, context: int = 0, bytes_per_param: float = 2) -> bool:
    return memory_bytes(shape, batch, context, bytes_per_param) <= device.memory_bytes


# ---- this machine --------------------------------------------------------------------


def probe_this_machine(
    seconds: float = 3.0, dtype=None, copy_mib: int = 256, gemm_n: int = 2048, device: str = "cpu"
) -> Device:
    """Measured copy bandwidth and GEMM FLOP/s (best of repeats) of this machine's CPU or a CUDA device.

    Best rather than median, because a roofline is a ceiling and the machine is shared:
    other work only ever makes a run slower.  Half of ``seconds`` goes to each probe.
    """
    import psutil
    import torch

    dtype = dtype or torch.float32
    device = torch.device(device)
    cuda = device.type == "cuda"

    def timed(fn) -> tuple[float, int]:
        fn()
        best, runs, end = float("inf"), 0, time.perf_counter() + seconds / 2
        while time.perf_counter() < end or runs < 2:
            if cuda:
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - started)
            runs += 1
        return best, runs

    # Far larger than any cache, so the copy measures DRAM/HBM: read + write of the buffer each time.
    elements = copy_mib * 2**20 // torch.empty((), dtype=dtype).element_size()
    src = torch.ones(elements, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    best_copy, copies = timed(lambda: dst.copy_(src))
    bandwidth = 2 * src.numel() * src.element_size() / best_copy
    src = dst = None  # the buffers go before the GEMM's are made
    a = torch.randn(gemm_n, gemm_n, device=device).to(dtype)
    b = torch.randn(gemm_n, gemm_n, device=device).to(dtype)
    best_gemm, gemms = timed(lambda: torch.mm(a, b))
    flops = 2 * gemm_n**3 / best_gemm
    dtype_name = model_facts.dtype_name(dtype)
    if cuda:
        props = torch.cuda.get_device_properties(device)
        name, memory = f"this machine ({props.name}, {dtype_name})", float(props.total_memory)
    else:
        name = f"this machine ({cpu_name()}, {torch.get_num_threads()} threads, {dtype_name})"
        memory = float(psutil.virtual_memory().total)
    return Device(
        name=name,
        peak_flops=flops,
        bandwidth=bandwidth,
        memory_bytes=memory,
        source=(
            f"probe_this_machine: best of {copies} copies of {copy_mib} MiB (read + write counted) and "
            f"best of {gemms} {gemm_n}x{gemm_n} {dtype_name} GEMMs on {device.type}, torch {torch.__version__}"
        ),
    )
