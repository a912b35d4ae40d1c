"""Batch-1 decode: served hf-kv / hf-flash, with and without ``--compile``, against transformers'
own ``generate`` with a dynamic and with a static (compiled) cache (``make bench-compile``).

All in one run on the device at hand, same model, dtype, prompts and token count, so the
ratios hold even where absolute times are noisy:

- ``generate`` dynamic: ``model.generate`` with transformers' default cache, the attention
  implementation each engine uses (eager for hf-kv, SDPA for hf-flash);
- ``generate`` static: ``cache_implementation="static"`` with its compiled decode step
  (transformers compiles it on CUDA by itself; here it is asked to on every device, so a
  CPU run compares like with like);
- served: one streamed gRPC request at a time through a real server (bench/engine_speed.py).

Each served row's ratio is to the ``generate`` row with the same cache kind and attention.
"""

from __future__ import annotations

import argparse
import time

from loadtest.measure.prompts import LOG_SPEED_PROMPTS
from loadtest.measure.tables import markdown_table

from .engine_speed import run_engine

ENGINE_ATTENTION = {"hf-kv": "eager", "hf-flash": "sdpa"}


def generate_speed(model_path, attention: str, cache: str, dtype: str, device: str, new_tokens: int) -> dict:
    """tokens/s of ``model.generate`` (greedy, exactly ``new_tokens``), mean over the log's prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.configuration_utils import CompileConfig

    from engines.hf.model import resolve_device, resolve_dtype

    torch_device = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=resolve_dtype(dtype, torch_device), attn_implementation=attention
    ).to(torch_device)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    extra = {}
    if cache == "static":
        mode = "reduce-overhead" if torch_device.type == "cuda" else "default"
        compile_config = CompileConfig(mode=mode, dynamic=False, fullgraph=False)
        compile_config._compile_all_devices = True  # transformers compiles only on CUDA unless told
        extra = {"cache_implementation": "static", "compile_config": compile_config}

    def once(prompt: str) -> float:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(torch_device)
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = model.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra
        )
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] - ids.shape[1] == new_tokens
        return new_tokens / (time.perf_counter() - started)

    warm_up_started = time.perf_counter()
    once("Warm-up")  # the static cache's step compiles here, not in the figures
    warm_up_s = time.perf_counter() - warm_up_started
    speeds = [once(prompt) for prompt in LOG_SPEED_PROMPTS]
    return {
        "what": f"transformers generate, {cache} cache",
        "attention": attention,
        "cache": cache,
        "tokens_per_s": sum(speeds) / len(speeds),
        "warm_up_s": warm_up_s,
    }


def served_speed(engine: str, model: str, compiled: bool, dtype: str, device: str, new_tokens: int) -> dict:
    extra = ["--dtype", dtype, "--device", device] + (["--compile"] if compiled else [])
    started = time.perf_counter()
    row = run_engine(engine, model, new_tokens, extra)
    return {
        "what": f"served {engine}" + (" --compile" if compiled else ""),
        "attention": ENGINE_ATTENTION[engine],
        "kernel": row["attention"],
        "cache": "static" if compiled else "dynamic",
        "tokens_per_s": row["tokens_per_s"],
        "warm_up_s": time.perf_counter() - started,  # server start, load and (with --compile) warm-up
    }


def ratios(rows: list[dict]) -> list[dict]:
    """Each served row against the generate row with the same attention and cache kind."""
    reference = {(r["attention"], r["cache"]): r["tokens_per_s"] for r in rows if r["what"].startswith("transformers")}
    for row in rows:
        if row["what"].startswith("served"):
            base = reference.get((row["attention"], row["cache"]))
            row["vs_generate"] = f"{row['tokens_per_s'] / base:.2f}x" if base else "n/a"
    return rows


def run(model: str, model_path, engines: list[str], dtype: str, device: str, new_tokens: int) -> list[dict]:
    rows = []
    for engine in engines:
        attention = ENGINE_ATTENTION[engine]
        for cache in ("dynamic", "static"):
            if not any(r["attention"] == attention and r["cache"] == cache for r in rows):
                print(f"# transformers generate, {attention} attention, {cache} cache ...", flush=True)
                rows.append(generate_speed(model_path, attention, cache, dtype, device, new_tokens))
        for compiled in (False, True):
            print(f"# served {engine}{' --compile' if compiled else ''} ...", flush=True)
            rows.append(served_speed(engine, model, compiled, dtype, device, new_tokens))
    return ratios(rows)


def table(rows: list[dict]) -> str:
    return markdown_table(
        rows,
        ["what", "attention", "kernel", "cache", "tokens_per_s", "vs_generate", "warm_up_s"],
        {
            "attention": "attention asked",
            "kernel": "kernel that ran",
            "tokens_per_s": "tokens/s",
            "vs_generate": "vs generate (same cache)",
            "warm_up_s": "start + warm-up (s)",
        },
    )


def main() -> None:
    from engines.models import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--engines", default="hf-kv,hf-flash")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    rows = run(args.model, resolve_model(args.model), args.engines.split(","), args.dtype, args.device, args.new_tokens)
    print(
        f"\nmodel {args.model}, dtype {args.dtype}, device {args.device}, batch 1, greedy, "
        f"{args.new_tokens} new tokens, mean of the log's {len(LOG_SPEED_PROMPTS)} prompts\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
