"""KV cache and flash attention against length: hf-eager, hf-kv and hf-flash, tokens/s and memory.

Each engine's own decode loop (the code the server runs) generates greedily with
ignore_eos, and every token's arrival time is recorded, so one generation of N tokens
gives tokens/s at every output length up to N: tokens/s at L = L / (time to the L-th
token), the inference log's "Speed" (docs/design.md).  Without a cache each step
recomputes the whole sequence, so a step costs time proportional to the length and a
generation its square; with a cache a step costs about the same at every length and a
generation grows linearly.  The growth exponent is fitted on the upper half of the lengths.

Memory is the peak tensor memory of the step that produces the L-th token, the KV cache
it holds included (the weights are not counted): see ``bench/memory.py``; against prompt
length also the prefill's, the first step over the whole prompt.

The prompt-length sweep feeds prompts of P tokens (text from the Python standard
library's source) and generates ``--prompt-new-tokens`` tokens from each.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from loadtest.measure.plots import line_plot, pyplot
from loadtest.measure.prompts import LOG_SPEED_PROMPTS
from loadtest.measure.report_folder import Report

from .memory import peak_bytes, peak_bytes_with_cache

ENGINES = ("hf-eager", "hf-kv", "hf-flash")
LOG_PROMPT = LOG_SPEED_PROMPTS[0]


def load_engine(name: str, model: str, dtype: str, device: str):
    """The engine's model (engines/hf/model.py ``HFModel``), as the server loads it for that engine."""
    from engines.registry import engine_class

    return engine_class(name).load_model(model, dtype, device)


def token_times(lm, prompt_ids: list[int], new_tokens: int, progress=None) -> list[float]:
    """Seconds from the start to each generated token, through the engine's own decode loop."""
    from engines.params import SamplingParams

    stamps: list[float] = []
    started = time.perf_counter()
    for output in lm.generate(prompt_ids, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)):
        stamps.append(time.perf_counter())
        if progress is not None:
            progress.update(len(output.token_ids))
    return [t - started for t in stamps]


def step_memory(lm, ids: list[int]) -> int:
    """Peak bytes of the step that turns ``ids`` into one more token, the cache it reads counted."""
    tokens = torch.tensor([ids], device=lm.device)
    with torch.inference_mode(), lm.kernel():
        if not lm.use_cache:
            return peak_bytes(lambda: lm.next_logits(tokens, tokens, None), lm.device)
        cache = lm.new_cache()
        lm.next_logits(tokens[:, :-1], tokens[:, :-1], cache)  # fills the cache with all but the last token
        return peak_bytes_with_cache(cache, lambda: lm.next_logits(tokens[:, -1:], tokens, cache), lm.device)


def step_times(times: list[float]) -> list[float]:
    """Seconds of each step from the arrival times (the first step includes the prefill)."""
    return [times[0]] + [b - a for a, b in zip(times, times[1:])]


def step_slope_ms(steps: list[float]) -> float:
    """How much a step slows per token of length (ms): medians of the first and last quarter of the
    steps (prefill excluded), so a burst of other work on the machine does not tilt it."""
    steps = steps[1:]
    if len(steps) < 8:
        return float("nan")
    quarter = len(steps) // 4
    early, late = statistics.median(steps[:quarter]), statistics.median(steps[-quarter:])
    return 1000 * (late - early) / (len(steps) - quarter)


def prefill_memory(lm, ids: list[int]) -> int:
    """Peak bytes of the first step over the whole prompt, the cache it fills included."""
    tokens = torch.tensor([ids], device=lm.device)
    with torch.inference_mode(), lm.kernel():
        cache = lm.new_cache()
        return peak_bytes(lambda: lm.next_logits(tokens, tokens, cache), lm.device)


def growth_exponent(lengths: list[int], seconds: list[float]) -> float:
    """Slope of log(time) against log(length) over the upper half of the lengths: 1 linear, 2 quadratic."""
    points = [(math.log(n), math.log(t)) for n, t in zip(lengths, seconds) if t > 0]
    points = points[len(points) // 2 :] if len(points) >= 4 else points
    if len(points) < 2:
        return float("nan")
    mean_x = sum(p[0] for p in points) / len(points)
    mean_y = sum(p[1] for p in points) / len(points)
    sxx = sum((p[0] - mean_x) ** 2 for p in points)
    return sum((p[0] - mean_x) * (p[1] - mean_y) for p in points) / sxx


def stdlib_text(min_chars: int = 200_000) -> str:
    """Deterministic text that ships with Python: standard-library modules in sorted order."""
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(errors="replace")
        parts.append(text)
        size += len(text)
        if size >= min_chars:
            break
    return "".join(parts)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument(
        "--output-lengths",
        default="32,64,128,256,512,1024",
        help="points reported; one generation of the largest gives them all",
    )
    parser.add_argument(
        "--eager-max-output",
        type=int,
        default=512,
        help="hf-eager stops here: its time grows with the square of the length",
    )
    parser.add_argument("--prompt-lengths", default="32,64,128,256,512,1024")
    parser.add_argument("--prompt-new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="report folder (default reports/cache-vs-length-<time>)")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    engines = args.engines.split(",")
    output_lengths = _ints(args.output_lengths)
    prompt_lengths = _ints(args.prompt_lengths)
    loaded = {}
    for name in engines:
        print(f"# loading {name} with {args.model}", flush=True)
        loaded[name] = load_engine(name, args.model, args.dtype, args.device)
    first = loaded[engines[0]]
    report = Report("cache-vs-length", args.out, "bench.cache_vs_length", argv, device=str(first.device))
    report.text(__doc__.split("\n", 2)[2])
    report.table(
        "engines",
        [
            {
                "engine": n,
                "use_cache": e.use_cache,
                "attention kernel": e.attention,
                "dtype": e.dtype_name,
                "device": str(e.device),
            }
            for n, e in loaded.items()
        ],
        title="Engines",
    )

    prompt_ids = first.tokenizer(LOG_PROMPT).input_ids
    output_rows, curves = [], {}
    for name, engine in loaded.items():
        cap = args.eager_max_output if not engine.use_cache else max(output_lengths)
        lengths = [n for n in output_lengths if n <= cap]
        if not lengths:
            continue
        token_times(engine, prompt_ids, 4)  # warm-up
        with tqdm(total=max(lengths), desc=f"{name}: generating {max(lengths)} tokens", unit="tok") as bar:
            times = token_times(engine, prompt_ids, max(lengths), bar)
        curves[name] = times
        steps = step_times(times)
        for n in tqdm(lengths, desc=f"{name}: step memory", unit="point"):
            # the median of the last few steps: a shared machine's stray burst moves one step, not the median
            step_ms = 1000 * statistics.median(steps[max(0, n - 9) : n])
            memory = step_memory(engine, prompt_ids + [0] * (n - 1))
            row = {
                "engine": name,
                "prompt_tokens": len(prompt_ids),
                "output_tokens": n,
                "seconds": times[n - 1],
                "tokens_per_s": n / times[n - 1],
                "last_step_ms": step_ms,
                "step_peak_mib": memory / 2**20,
            }
            output_rows.append(row)
            print(
                f"  {name:9} {n:5d} tokens  {row['tokens_per_s']:7.2f} tok/s  last step {step_ms:7.1f} ms  "
                f"peak {row['step_peak_mib']:7.1f} MiB",
                flush=True,
            )
    for name, times in curves.items():
        lengths = [r["output_tokens"] for r in output_rows if r["engine"] == name]
        exponent = growth_exponent(lengths, [times[n - 1] for n in lengths])
        slope = step_slope_ms(step_times(times))
        for r in output_rows:
            if r["engine"] == name:
                r["growth_exponent"] = exponent
                r["step_ms_per_token"] = slope
    report.table(
        "steps",
        [
            {"engine": name, "token": i + 1, "seconds": t, "step_ms": 1000 * s}
            for name, times in curves.items()
            for i, (t, s) in enumerate(zip(times, step_times(times)))
        ],
        title="Every step (arrival time of each token)",
    )
    report.sections.pop()  # thousands of rows: CSV and JSON only, not the page
    report.table(
        "output_length",
        output_rows,
        [
            "engine",
            "prompt_tokens",
            "output_tokens",
            "seconds",
            "tokens_per_s",
            "last_step_ms",
            "step_peak_mib",
            "growth_exponent",
            "step_ms_per_token",
        ],
        headers={
            "tokens_per_s": "tokens/s",
            "last_step_ms": "step at L (ms, median of 9)",
            "step_peak_mib": "step peak (MiB)",
            "growth_exponent": "time ~ length^k, k",
            "step_ms_per_token": "step growth (ms per token)",
        },
        title=f"Against output length (the log's first prompt, {len(prompt_ids)} tokens)",
        note=f"hf-eager stops at {args.eager_max_output} output tokens (--eager-max-output).",
    )

    corpus_ids = first.tokenizer(stdlib_text()).input_ids
    prompt_rows = []
    for name, engine in loaded.items():
        for p in tqdm(prompt_lengths, desc=f"{name}: prompt lengths", unit="prompt"):
            ids = corpus_ids[:p]
            times = token_times(engine, ids, args.prompt_new_tokens)
            memory = step_memory(engine, ids + [0] * (args.prompt_new_tokens - 1))
            first_memory = prefill_memory(engine, ids)
            row = {
                "engine": name,
                "prompt_tokens": p,
                "output_tokens": args.prompt_new_tokens,
                "first_token_ms": times[0] * 1000,
                "seconds": times[-1],
                "tokens_per_s": args.prompt_new_tokens / times[-1],
                "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan"),
                "prefill_peak_mib": first_memory / 2**20,
                "step_peak_mib": memory / 2**20,
            }
            prompt_rows.append(row)
            print(
                f"  {name:9} prompt {p:5d}  first token {row['first_token_ms']:8.1f} ms  "
                f"{row['tokens_per_s']:7.2f} tok/s  peak {row['step_peak_mib']:7.1f} MiB",
                flush=True,
            )
    report.table(
        "prompt_length",
        prompt_rows,
        [
            "engine",
            "prompt_tokens",
            "output_tokens",
            "first_token_ms",
            "tokens_per_s",
            "decode_tokens_per_s",
            "prefill_peak_mib",
            "step_peak_mib",
        ],
        headers={
            "first_token_ms": "first token (ms)",
            "tokens_per_s": "tokens/s (incl. prefill)",
            "decode_tokens_per_s": "tokens/s after the first",
            "prefill_peak_mib": "prefill peak (MiB)",
            "step_peak_mib": "last step peak (MiB)",
        },
        title=f"Against prompt length ({args.prompt_new_tokens} new tokens each)",
    )
    plot(report, output_rows, prompt_rows, curves)
    print(f"\nreport: {report.markdown_path}")


def plot(report: Report, output_rows: list[dict], prompt_rows: list[dict], curves: dict[str, list[float]]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for name, times in curves.items():
        lengths = list(range(1, len(times) + 1))
        ax.plot(lengths, times, label=name)
    top = max((len(t) for t in curves.values()), default=1)
    if curves:
        # reference slopes through each curve's last point: a line has slope 1, a square slope 2
        anchor_name = max(curves, key=lambda n: curves[n][-1])
        anchor = curves[anchor_name]
        xs = [top / 8, top]
        ax.plot(xs, [anchor[-1] * (x / len(anchor)) ** 2 for x in xs], "k--", lw=0.8, label="~ length^2")
        ax.plot(xs, [anchor[-1] * (x / len(anchor)) for x in xs], "k:", lw=0.8, label="~ length")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("output tokens")
    ax.set_ylabel("seconds to generate them")
    ax.set_title("generation time against output length")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax = axes[1]
    for name, times in curves.items():
        steps = step_times(times)
        ax.plot(range(1, len(steps) + 1), [s * 1000 for s in steps], label=name, lw=0.8)
    ax.set_xlabel("output token")
    ax.set_ylabel("step time (ms)")
    ax.set_title("each step: grows with the length without a cache")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    line_plot(
        axes[2],
        output_rows,
        "output_tokens",
        "step_peak_mib",
        "engine",
        logx=True,
        logy=True,
        xlabel="output tokens",
        ylabel="peak tensor memory of the step (MiB)",
        title="memory against output length",
    )
    report.figure("output_length", fig, "Time and memory against output length")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    line_plot(
        axes[0],
        prompt_rows,
        "prompt_tokens",
        "first_token_ms",
        "engine",
        logx=True,
        logy=True,
        xlabel="prompt tokens",
        ylabel="time to first token (ms)",
        title="prefill",
    )
    line_plot(
        axes[1],
        prompt_rows,
        "prompt_tokens",
        "decode_tokens_per_s",
        "engine",
        logx=True,
        logy=True,
        xlabel="prompt tokens",
        ylabel="tokens/s after the first",
        title="decode speed against prompt length",
    )
    line_plot(
        axes[2],
        prompt_rows,
        "prompt_tokens",
        "prefill_peak_mib",
        "engine",
        logx=True,
        logy=True,
        xlabel="prompt tokens",
        ylabel="peak tensor memory of the prefill (MiB)",
        title="memory",
    )
    report.figure("prompt_length", fig, "Against prompt length")


if __name__ == "__main__":
    main()
