"""Causal attention kernels against sequence length: eager, each SDPA backend forced, flash-attn.

For every cell of a grid (batch, heads, sequence length, head dim, dtype) and every
implementation: the median time after warm-up, the peak memory the call allocates, the
achieved TFLOP/s, and the relative error of the output against a float64 reference.
A backend that cannot run a shape says why in its cell instead of a number.

- time: median of ``--repeats`` calls after ``--warmup``; CUDA calls are synchronised.
- peak memory: bytes allocated beyond the inputs at the call's high-water mark;
  ``torch.cuda.max_memory_allocated`` on CUDA, the profiler's allocator events on a CPU
  (which see every allocation the kernels make, their scratch buffers included).
- FLOPs: causal attention does half of the 4 x b x h x s^2 x d of the two matmuls; a
  backward pass counts 2.5 times the forward (the convention of the FlashAttention papers).
- error: ||out - ref|| / ||ref|| with ref computed in float64; float32 must stay under
  1e-3 and bf16/fp16 under 1e-2, and a NaN fails.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engines.hf.model import resolve_device
from loadtest.measure.plots import line_plot, pyplot
from loadtest.measure.report_folder import Report

from .memory import peak_bytes

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BACKWARD_FACTOR = 2.5


def _sdpa_backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    names = {
        "sdpa-math": "MATH",
        "sdpa-flash": "FLASH_ATTENTION",
        "sdpa-mem-efficient": "EFFICIENT_ATTENTION",
        "sdpa-cudnn": "CUDNN_ATTENTION",
    }
    return {label: getattr(SDPBackend, member) for label, member in names.items() if hasattr(SDPBackend, member)}


IMPLEMENTATIONS = ["eager", *_sdpa_backends(), "flash-attn"]


def eager_attention(q, k, v):
    """matmul, softmax, matmul: what transformers' eager path does, the full score matrix in memory."""
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    seq = q.shape[-2]
    mask = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


@torch.no_grad()
def reference_attention(q, k, v):
    """float64, one head at a time so a 16k sequence does not need its whole score tensor at once."""
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            out[b, h] = eager_attention(q[b, h].double(), k[b, h].double(), v[b, h].double())
    return out


def make_call(implementation: str):
    """A function (q, k, v) -> out for the implementation, or raise with the reason it cannot run."""
    if implementation == "eager":
        return eager_attention
    if implementation == "flash-attn":
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            raise RuntimeError("flash-attn package not installed") from None

        def flash(q, k, v):
            if q.device.type != "cuda":
                raise RuntimeError("flash-attn runs on CUDA only")
            # flash-attn wants (batch, seq, heads, dim)
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            return out.transpose(1, 2)

        return flash
    backend = _sdpa_backends().get(implementation)
    if backend is None:
        raise RuntimeError(f"this torch has no {implementation}")
    from torch.nn.attention import sdpa_kernel

    def sdpa(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return sdpa


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, backward: bool) -> float:
    forward = 2 * batch * heads * seq * seq * head_dim  # half of 4bhs^2d: causal
    return forward * (1 + BACKWARD_FACTOR) if backward else forward


@dataclass
class Cell:
    batch: int
    heads: int
    seq: int
    head_dim: int
    dtype: str


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(call, q, k, v, backward: bool):
    if not backward:
        with torch.no_grad():
            return call(q, k, v)
    q.grad = k.grad = v.grad = None
    out = call(q, k, v)
    out.backward(torch.ones_like(out))
    return out


def measure(
    implementation: str,
    cell: Cell,
    device: torch.device,
    warmup: int,
    repeats: int,
    backward: bool,
    reference_cache: dict,
) -> dict:
    row = {
        "impl": implementation,
        "batch": cell.batch,
        "heads": cell.heads,
        "seq": cell.seq,
        "head_dim": cell.head_dim,
        "dtype": cell.dtype,
        "pass": "fwd+bwd" if backward else "fwd",
    }
    dtype = DTYPES[cell.dtype]
    generator = torch.Generator(device="cpu").manual_seed(cell.seq * 1000 + cell.head_dim)
    shape = (cell.batch, cell.heads, cell.seq, cell.head_dim)
    base = [torch.randn(shape, generator=generator) for _ in range(3)]
    # clone: .to() may return the very tensor, and the reference must not join the autograd graph
    q, k, v = (t.to(device=device, dtype=dtype).clone().requires_grad_(backward) for t in base)
    try:
        call = make_call(implementation)
        out = _run(call, q, k, v, backward)
        _synchronize(device)
    except Exception as exc:  # the backend's own words are the cell: "No available kernel", OOM, ...
        row["status"] = _short_reason(exc)
        return row
    key = (cell.batch, cell.heads, cell.seq, cell.head_dim)
    if key not in reference_cache:
        reference_cache.clear()  # one shape at a time: a 16k float64 reference is large
        reference_cache[key] = reference_attention(*(t.to(device) for t in base))
    reference = reference_cache[key]
    diff = (out.detach().double() - reference).norm() / reference.norm()
    row["rel_error"] = float(diff)
    del out
    for _ in range(max(0, warmup - 1)):
        _run(call, q, k, v, backward)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        started = time.perf_counter()
        _run(call, q, k, v, backward)
        _synchronize(device)
        times.append(time.perf_counter() - started)
    row["time_ms"] = statistics.median(times) * 1000
    row["tflops"] = (
        attention_flops(cell.batch, cell.heads, cell.seq, cell.head_dim, backward) / statistics.median(times) / 1e12
    )
    row["peak_mib"] = peak_bytes(lambda: _run(call, q, k, v, backward), device) / 2**20
    ok = math.isfinite(row["rel_error"]) and row["rel_error"] < TOLERANCE[dtype]
    row["status"] = "ok" if ok else f"FAIL: error {row['rel_error']:.2e} over {TOLERANCE[dtype]:g}"
    return row


def _short_reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    if "No available kernel" in text or "No viable backend" in text:
        return "cannot run: no available kernel for this device/dtype/shape"
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory"
    return "cannot run: " + (text[:120] or type(exc).__name__)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1", help="comma-separated")
    parser.add_argument("--heads", default="8")
    parser.add_argument("--seq", default="256,512,1024,2048,4096", help="sequence lengths (on a GPU try up to 16384)")
    parser.add_argument("--head-dim", default="64,128")
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--backward", action="store_true", help="time forward + backward instead of forward")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="report folder (default reports/attention-<time>)")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    device = resolve_device(args.device)
    report = Report("attention", args.out, "bench.attention_kernels", argv, device=str(device))
    report.text(__doc__.split("\n", 2)[2])
    cells = [
        Cell(b, h, s, d, t)
        for t in args.dtype.split(",")
        for d in _ints(args.head_dim)
        for b in _ints(args.batch)
        for h in _ints(args.heads)
        for s in _ints(args.seq)
    ]
    impls = args.impls.split(",")
    rows, reference_cache = [], {}
    bar = tqdm(total=len(cells) * len(impls), unit="cell")
    for cell in cells:
        for impl in impls:
            bar.set_description(f"{impl} {cell.dtype} b{cell.batch} h{cell.heads} s{cell.seq} d{cell.head_dim}")
            row = measure(impl, cell, device, args.warmup, args.repeats, args.backward, reference_cache)
            rows.append(row)
            bar.write(_progress_line(row))
            bar.update()
    bar.close()
    reference_cache.clear()
    columns = [
        "impl",
        "dtype",
        "batch",
        "heads",
        "seq",
        "head_dim",
        "pass",
        "time_ms",
        "peak_mib",
        "tflops",
        "rel_error",
        "status",
    ]
    report.table(
        "attention",
        rows,
        columns,
        title="Every cell",
        headers={"time_ms": "median ms", "peak_mib": "peak MiB", "tflops": "TFLOP/s", "rel_error": "rel. error"},
    )
    report.table(
        "attention_summary",
        summary_rows(rows),
        title="Time (ms) by sequence length",
        note="One row per implementation and dtype/head dim; a dash is a backend that could not run.",
    )
    plot(report, rows)
    print(f"\nreport: {report.markdown_path}")


def _progress_line(row: dict) -> str:
    head = f"{row['impl']:>18} {row['dtype']:>8} b{row['batch']} h{row['heads']} s{row['seq']:>5} d{row['head_dim']:>3}"
    if "time_ms" not in row:
        return f"{head}  {row['status']}"
    return (
        f"{head}  {row['time_ms']:9.2f} ms  {row['peak_mib']:8.1f} MiB  {row['tflops']:7.3f} TFLOP/s  "
        f"err {row['rel_error']:.1e}  {row['status']}"
    )


def summary_rows(rows: list[dict]) -> list[dict]:
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["impl"], r["dtype"], r["batch"], r["heads"], r["head_dim"])
        entry = out.setdefault(
            key, {"impl": r["impl"], "dtype": r["dtype"], "b/h/d": f"{r['batch']}/{r['heads']}/{r['head_dim']}"}
        )
        entry[f"s={r['seq']}"] = round(r["time_ms"], 2) if "time_ms" in r else "-"
    return list(out.values())


def plot(report: Report, rows: list[dict]) -> None:
    plt = pyplot()
    ran = [r for r in rows if "time_ms" in r]
    if not ran:
        return
    panels = sorted({(r["dtype"], r["batch"], r["heads"], r["head_dim"]) for r in ran})
    for metric, label, stem in (
        ("time_ms", "median time (ms)", "attention_time"),
        ("peak_mib", "peak memory (MiB)", "attention_memory"),
    ):
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (dtype, b, h, d) in zip(axes[0], panels):
            subset = [r for r in ran if (r["dtype"], r["batch"], r["heads"], r["head_dim"]) == (dtype, b, h, d)]
            line_plot(
                ax,
                subset,
                "seq",
                metric,
                "impl",
                logx=True,
                logy=True,
                xlabel="sequence length",
                ylabel=label,
                title=f"{dtype}, batch {b}, {h} heads, head dim {d}",
            )
        report.figure(stem, fig, f"{label} against sequence length, causal attention")


if __name__ == "__main__":
    main()
