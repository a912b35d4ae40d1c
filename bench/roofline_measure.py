"""Token processing speed for the 1.6B/7B/13B/30B shapes: roofline bounds and measurements beside them.

For each model shape (``bench/shapes``) and each device (the A100/H100/H200 presets and
this machine, probed for copy bandwidth and GEMM FLOP/s): the decode and prefill
tokens/s bounds and the memory for weights plus KV cache (see ``loadtest/measure/roofline.py``).

Beside the bound, measured here: random-weight models built from the shapes (Llama-style
or BLOOM-style as the shape says, in the serving dtype), prefill tokens/s at each prompt
length and decode tokens/s with a KV cache after ``--context`` tokens, greedy, batch 1 or
more.  Random weights run at the speed of trained ones: speed depends on the shape alone.

Then the inference log's one row (docs/design.md), 30.76 tokens/s for Yayi-base 7B on one
A100-80G, as a share of the A100's decode bound, and what the bound lets the other sizes
reach there.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engines.hf.model import resolve_device
from loadtest.measure import roofline as rl
from loadtest.measure.plots import pyplot
from loadtest.measure.report_folder import Report

from .memory import peak_bytes, peak_bytes_with_cache
from .roofline import BOUNDS_HEADERS, LOG_ROW, bounds_rows, load_shape

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def hf_config(shape: rl.ModelShape, dtype: torch.dtype):
    from transformers import BloomConfig, LlamaConfig

    common = dict(
        vocab_size=shape.vocab,
        tie_word_embeddings=shape.tie_embeddings,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        dtype=dtype,
    )
    if shape.architecture == "bloom":
        return BloomConfig(hidden_size=shape.hidden, n_layer=shape.layers, n_head=shape.heads, **common)
    return LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.dim_head,
        max_position_embeddings=max(shape.max_context, 4096),
        **common,
    )


def build_model(shape: rl.ModelShape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(shape, dtype), dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_prefill(model, device, batch: int, prompt: int, repeats: int) -> tuple[float, int]:
    ids = torch.randint(
        0,
        model.config.vocab_size,
        (batch, prompt),
        device=device,
        generator=torch.Generator(device=device).manual_seed(prompt),
    )
    call = lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1)  # noqa: E731
    with torch.inference_mode():
        call()
        times = []
        for _ in range(repeats):
            _sync(device)
            started = time.perf_counter()
            call()
            _sync(device)
            times.append(time.perf_counter() - started)
        memory = peak_bytes(call, device)
    return batch * prompt / statistics.median(times), memory


def measure_decode(model, device, batch: int, context: int, steps: int) -> tuple[float, int]:
    """Decode tokens/s over the batch after a prompt of ``context`` tokens, KV cache on, greedy."""
    from transformers import DynamicCache

    ids = torch.randint(
        0,
        model.config.vocab_size,
        (batch, max(context, 1)),
        device=device,
        generator=torch.Generator(device=device).manual_seed(context),
    )
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        token = (
            model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            .logits[:, -1]
            .argmax(-1, keepdim=True)
        )
        _sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            token = (
                model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
                .logits[:, -1]
                .argmax(-1, keepdim=True)
            )
        _sync(device)
        elapsed = time.perf_counter() - started
        memory = peak_bytes_with_cache(
            cache, lambda: model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1), device
        )
    return batch * steps / elapsed, memory


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1.6b,7b,13b,30b", help="names under bench/shapes or JSON paths")
    parser.add_argument("--devices", default=",".join(rl.DEVICES))
    parser.add_argument(
        "--measure",
        default=None,
        help="shapes to build and time here (default: 1.6b on a CPU, 1.6b,7b on CUDA; '' for none)",
    )
    parser.add_argument("--dtype", default="bfloat16", help="serving dtype of the measured models and the probe")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", default="1", help="decode batch sizes, comma-separated")
    parser.add_argument("--context", type=int, default=512, help="tokens in the KV cache while decoding")
    parser.add_argument("--prompts", default="128,512", help="prefill prompt lengths")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probe-seconds", type=float, default=4.0)
    parser.add_argument("--out", help="report folder (default reports/token-speed-<time>)")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    bytes_per_param = torch.empty((), dtype=dtype).element_size()
    measure_names = args.measure if args.measure is not None else ("1.6b,7b" if device.type == "cuda" else "1.6b")
    report = Report("token-speed", args.out, "bench.roofline_measure", argv, device=str(device))
    report.text(__doc__.split("\n", 2)[2])

    shapes = [load_shape(name) for name in args.shapes.split(",") if name]
    report.table(
        "shapes",
        [
            {
                "model": s.name,
                "architecture": s.architecture,
                "positions": s.positions,
                "params": s.params,
                "layers": s.layers,
                "hidden": s.hidden,
                "heads": s.heads,
                "kv_heads": s.kv_heads,
                "intermediate": s.intermediate,
                "vocab": s.vocab,
                "source": s.source,
            }
            for s in shapes
        ],
        title="Model shapes",
    )
    print(f"# probing {device} ({args.dtype}) for {args.probe_seconds:g} s ...", flush=True)
    here = rl.probe_this_machine(args.probe_seconds, dtype, device=str(device))
    print(f"  {here.peak_flops / 1e12:.3f} TFLOP/s, {here.bandwidth / 1e9:.1f} GB/s", flush=True)
    devices = [rl.DEVICES[name] for name in args.devices.split(",") if name] + [here]
    report.table(
        "devices",
        [
            {
                "device": d.name,
                "TFLOP/s": d.peak_flops / 1e12,
                "GB/s": d.bandwidth / 1e9,
                "memory GB": d.memory_bytes / 1e9,
                "ridge FLOP/byte": d.peak_flops / d.bandwidth,
                "source": d.source,
            }
            for d in devices
        ],
        title="Devices",
    )

    batches = _ints(args.batch)
    bound_rows = []
    for batch in batches:
        rows = bounds_rows(shapes, devices, batch, args.context, max(_ints(args.prompts) or [512]), bytes_per_param)
        bound_rows += rows
    report.table(
        "bounds",
        bound_rows,
        [
            "model",
            "params_b",
            "device",
            "batch",
            "context",
            "weights_gb",
            "memory_gb",
            "fits",
            "decode_bound_tok_s",
            "decode_bound_kind",
            "prefill_bound_tok_s",
        ],
        headers={
            **BOUNDS_HEADERS,
            "prefill_bound_tok_s": f"prefill bound (tok/s, prompt {max(_ints(args.prompts) or [512])})",
        },
        title=f"Bounds ({args.dtype}, decode with {args.context} tokens of context)",
    )

    measured = []
    for name in [n for n in measure_names.split(",") if n]:
        shape = load_shape(name)
        print(
            f"# building a random-weight {shape.name} ({shape.params / 1e9:.2f}B, {args.dtype}) on {device} ...",
            flush=True,
        )
        started = time.perf_counter()
        model = build_model(shape, dtype, device)
        print(f"  built in {time.perf_counter() - started:.0f} s", flush=True)
        work = [("prefill", 1, p) for p in _ints(args.prompts)] + [("decode", b, args.context) for b in batches]
        for phase, batch, length in tqdm(work, desc=f"{shape.name}: measuring", unit="point"):
            if phase == "prefill":
                tps, memory = measure_prefill(model, device, batch, length, args.repeats)
                bound = rl.prefill_bound_tokens_per_s(shape, here, batch, length, bytes_per_param)
            else:
                tps, memory = measure_decode(model, device, batch, length, args.decode_steps)
                bound = rl.decode_bound_tokens_per_s(shape, here, batch, length, bytes_per_param)
            row = {
                "model": shape.name,
                "phase": phase,
                "batch": batch,
                "tokens": length,
                "measured_tok_s": tps,
                "bound_tok_s": bound,
                "pct_of_bound": 100 * tps / bound,
                "weights_gib": shape.params * bytes_per_param / 2**30,
                "step_peak_mib": memory / 2**20,
            }
            measured.append(row)
            tqdm.write(
                f"  {shape.name} {phase:7} batch {batch} {length:5d} tokens: {tps:9.1f} tok/s, "
                f"bound {bound:9.1f} ({row['pct_of_bound']:.0f} %), "
                f"activations+cache peak {row['step_peak_mib']:.0f} MiB"
            )
        del model
    if measured:
        report.table(
            "measured",
            measured,
            [
                "model",
                "phase",
                "batch",
                "tokens",
                "measured_tok_s",
                "bound_tok_s",
                "pct_of_bound",
                "weights_gib",
                "step_peak_mib",
            ],
            headers={
                "tokens": "prompt / context",
                "measured_tok_s": "measured tok/s",
                "bound_tok_s": "bound here (tok/s)",
                "pct_of_bound": "% of bound",
                "weights_gib": "weights GiB",
                "step_peak_mib": "call peak beyond weights (MiB)",
            },
            title=f"Measured on {here.name}",
            note="Decode is timed over --decode-steps greedy steps after a prompt of --context tokens.",
        )

    report.table(
        "log_row",
        log_row_rows(shapes, args.context),
        title="The inference log's row against the A100 bound",
        note=(
            "30.76 tokens/s for Yayi-base 7B (BLOOM-7b1 shape) on one A100-80G, batch 1, bf16. "
            "'same share' scales each size's bound by the share the log's row reached."
        ),
    )
    plot(report, shapes, devices, measured, bytes_per_param, args.context)
    print(f"\nreport: {report.markdown_path}")


def log_row_rows(shapes: list[rl.ModelShape], context: int) -> list[dict]:
    a100 = rl.DEVICES[LOG_ROW["device"]]
    seven = load_shape(LOG_ROW["model"])
    rows = []
    for ctx in sorted({0, context}):
        share = LOG_ROW["tokens_per_s"] / rl.decode_bound_tokens_per_s(seven, a100, 1, ctx)
        for shape in shapes:
            bound = rl.decode_bound_tokens_per_s(shape, a100, 1, ctx)
            rows.append(
                {
                    "model": shape.name,
                    "context": ctx,
                    "A100 decode bound (tok/s)": bound,
                    "log measured (tok/s)": LOG_ROW["tokens_per_s"] if shape.name == seven.name else None,
                    "log % of bound": 100 * share if shape.name == seven.name else None,
                    "at the same share (tok/s)": bound * share,
                    "bf16 weights+KV (MB)": rl.memory_bytes(shape, 1, ctx) / 2**20,
                }
            )
    return rows


def plot(report: Report, shapes, devices, measured, bytes_per_param: float, context: int) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    batches = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    styles = ["-", "--", ":", "-."]
    for i, device in enumerate(d for d in devices if d.name.startswith(("A100", "H100", "H200"))):
        for j, shape in enumerate(shapes):
            ys = [rl.decode_bound_tokens_per_s(shape, device, b, context, bytes_per_param) for b in batches]
            ax.plot(batches, ys, styles[i % 4], color=f"C{j}", label=f"{shape.name} {device.name}" if True else None)
    seven = next((s for s in shapes if s.name == LOG_ROW["model"]), None)
    if seven is not None:
        ax.plot([1], [LOG_ROW["tokens_per_s"]], "k*", markersize=12, label="log: 7B on A100, 30.76 tok/s")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("decode bound, tokens/s over the batch")
    ax.set_title(f"decode roofline, context {context}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    ax = axes[1]
    if measured:
        labels = [f"{r['model']} {r['phase']}\nb{r['batch']} {r['tokens']}" for r in measured]
        xs = range(len(measured))
        ax.bar([x - 0.2 for x in xs], [r["bound_tok_s"] for r in measured], 0.4, label="bound here")
        ax.bar([x + 0.2 for x in xs], [r["measured_tok_s"] for r in measured], 0.4, label="measured")
        ax.set_xticks(list(xs), labels, fontsize="small")
        ax.set_yscale("log")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"measured beside the bound: {devices[-1].name}", fontsize="small")
        ax.legend()
        ax.grid(True, axis="y", alpha=0.3)
    report.figure("token_speed", fig, "Decode bounds against batch on the datasheet devices, and the measurements here")


if __name__ == "__main__":
    main()
