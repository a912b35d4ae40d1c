"""hf-cb against transformers' own ``generate_batch`` on one batch of requests, in one process (a GPU target).

    .venv/bin/python -m bench.hf_cb_batch --model PATH --device cuda --dtype bfloat16      # 64 x 128 tokens
    .venv/bin/python -m bench.hf_cb_batch --model tiny-llama --requests 8 --new-tokens 16   # a CPU smoke run

Both sides get the same model folder, the same KV cache (hf-cb's plan: blocks, block size,
batch token budget), the same requests (the log's prompts in turn, greedy, exactly
``--new-tokens`` each: EOS off) and, on CUDA, CUDA graphs.  Each side runs the batch once
to warm up (graph capture) and once timed.  hf-cb's figure is through the engine
(``ContinuousBatchingEngine.generate``: our detokenizer, stop-string filter and
per-request bookkeeping), without the gRPC server, so the comparison is the engine's cost
over the library's loop.  The target: hf-cb >= 0.9x generate_batch with CUDA graphs for 64
requests of 128 tokens.  A last row runs the engine again with ``--engine-process`` (its
manager in a child process), where the loop's Python is what a GPU waits on.  ``run()``
returns the rows, for scripts/gpu_check.py.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time

from engines import model_facts
from loadtest.measure.prompts import LOG_SPEED_PROMPTS


def generate_batch_tokens_per_s(model_dir, dtype, device, prompts: list[list[int]], new_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from engines.hf_cb.engine import default_cache_plan
    from engines.hf_cb.runtime import paged_implementation

    plan = default_cache_plan(str(model_dir), model_facts.dtype_name(dtype), str(device), len(prompts))
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=paged_implementation(model_dir, device)
    )
    model.to(device).eval()
    graphs = device.type == "cuda"
    config = plan.manager_config(graphs)
    generation = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1)
    try:
        for _ in ("warm-up (graph capture)", "timed"):  # the manager persists, so the second run is warm
            _sync(device)
            start = time.perf_counter()
            results = model.generate_batch(
                prompts, generation_config=generation, continuous_batching_config=config, persistent_manager=True
            )
            _sync(device)
            elapsed = time.perf_counter() - start
        return sum(len(r.generated_tokens) for r in results.values()) / elapsed
    finally:
        model.destroy_cached_continuous_batching_manager()
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def hf_cb_tokens_per_s(
    model_dir, dtype_name: str, device, prompts: list[str], new_tokens: int, engine_process: bool = False
) -> tuple[float, str]:
    from engines import EngineConfig, SamplingParams, create_engine
    from engines.hf_cb.engine import CBOptions

    options = CBOptions(cuda_graphs=device.type == "cuda" or None)
    engine = create_engine(
        "hf-cb",
        EngineConfig(
            model=str(model_dir),
            dtype=dtype_name,
            device=str(device),
            max_concurrency=len(prompts),
            max_queue=len(prompts),
            options=options,
            engine_process=engine_process,
        ),
    )
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    async def one(index: int, prompt: str) -> int:
        count = 0
        async for output in engine.generate(prompt, params, f"b{index}"):
            count = output.completion_tokens
        return count

    async def run() -> tuple[float, str]:
        await engine.start()
        try:
            for _ in ("warm-up", "timed"):
                start = time.perf_counter()
                counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
                elapsed = time.perf_counter() - start
            return sum(counts) / elapsed, engine.info().attention
        finally:
            await engine.shutdown()

    return asyncio.run(run())


def run(model: str, device_name: str = "auto", dtype_name: str = "auto", requests: int = 64, new_tokens: int = 128):
    from transformers import AutoTokenizer

    from engines.hf.model import resolve_device, resolve_dtype
    from engines.models import resolve_model

    model_dir = resolve_model(model)
    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    texts = [LOG_SPEED_PROMPTS[i % len(LOG_SPEED_PROMPTS)] for i in range(requests)]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reference = generate_batch_tokens_per_s(
        model_dir, dtype, device, [tokenizer(t).input_ids for t in texts], new_tokens
    )
    ours, attention = hf_cb_tokens_per_s(model_dir, model_facts.dtype_name(dtype), device, texts, new_tokens)
    # The same engine with its manager in a child process (--engine-process): what the socket costs or saves.
    # Its failure is a row of its own, so that it cannot hide the figures above.
    child_what = "hf-cb --engine-process"
    try:
        child, _ = hf_cb_tokens_per_s(model_dir, model_facts.dtype_name(dtype), device, texts, new_tokens, True)
    except Exception as exc:
        child, child_what = float("nan"), f"hf-cb --engine-process failed: {str(exc)[-300:]}"
    graphs = "with CUDA graphs" if device.type == "cuda" else "no graphs (CPU)"

    def over_reference(value: float) -> float:
        return value / reference if reference else float("nan")

    return [
        {"what": f"generate_batch, {graphs}", "tokens_per_s": reference},
        {"what": f"hf-cb engine, {graphs}: {attention}", "tokens_per_s": ours},
        {"what": "hf-cb / generate_batch", "tokens_per_s": over_reference(ours)},
        {"what": child_what, "tokens_per_s": child},
        {"what": "hf-cb --engine-process / generate_batch", "tokens_per_s": over_reference(child)},
    ]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    rows = run(args.model, args.device, args.dtype, args.requests, args.new_tokens)
    print(f"# {args.requests} requests x {args.new_tokens} tokens, {args.model}, {args.dtype}, {args.device}")
    for row in rows:
        print(f"| {row['what']} | {row['tokens_per_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
