"""What log-probabilities cost, and that not asking costs nothing: batch-1 tokens/s per engine, in process.

    .venv/bin/python -m bench.logprobs_cost --model smollm2-135m
    .venv/bin/python -m bench.logprobs_cost --model tiny-llama --rounds 2 --new-tokens 16   # a smoke run

For each engine (hf-kv and hf-cb by default), one started engine runs the log's speed
prompts one at a time (greedy, ignore_eos, exactly ``--new-tokens`` each) through
``Engine.generate`` (the request path the server drives, without gRPC) in each mode:

- none: no log-probabilities asked (the path every request took before they existed);
- logprobs=0: each chosen token's own;
- logprobs=5: with the 5 most likely alternatives;
- echo: logprobs=5 and prompt_logprobs=5 (the prompt's too: every prefill position's logits).

The modes alternate within each round, the order rotating round by round, so a load change
on a shared machine falls on all of them alike.  Each mode's ratio to "none" is taken within
a round and the median over rounds printed, with the median tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from loadtest.measure.prompts import LOG_SPEED_PROMPTS
from loadtest.measure.tables import markdown_table

MODES = {
    "none": {},
    "logprobs=0": {"logprobs": 0},
    "logprobs=5": {"logprobs": 5},
    "echo (logprobs=5, prompt_logprobs=5)": {"logprobs": 5, "prompt_logprobs": 5},
}


async def tokens_per_s(engine, params) -> float:
    """Completion tokens over the wall time of the log's prompts, sent one after another."""
    tokens = 0
    started = time.perf_counter()
    for number, prompt in enumerate(LOG_SPEED_PROMPTS):
        async for output in engine.generate(prompt, params, f"bench-{number}"):
            tokens += len(output.token_ids)
    return tokens / (time.perf_counter() - started)


async def measure_engine(name: str, model: str, new_tokens: int, rounds: int) -> list[dict]:
    from engines import EngineConfig, SamplingParams, create_engine

    engine = create_engine(name, EngineConfig(model=model))
    await engine.start()
    try:
        params = {
            mode: SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, **fields) for mode, fields in MODES.items()
        }
        for mode in MODES:  # warm-up: first-call costs (allocations, the sampler path) out of the figures
            async for _ in engine.generate("Warm-up", SamplingParams(max_new_tokens=4, **MODES[mode]), "warm-up"):
                pass
        speeds: dict[str, list[float]] = {mode: [] for mode in MODES}
        order = list(MODES)
        for number in range(rounds):
            turn = order[number % len(order) :] + order[: number % len(order)]
            for mode in turn:
                speeds[mode].append(await tokens_per_s(engine, params[mode]))
            print(
                f"# {name} round {number + 1}/{rounds}: "
                + ", ".join(f"{mode.split(' ')[0]} {speeds[mode][-1]:.1f}" for mode in MODES),
                flush=True,
            )
    finally:
        await engine.shutdown()
    rows = []
    for mode in MODES:
        ratios = [value / base for value, base in zip(speeds[mode], speeds["none"], strict=True)]
        rows.append(
            {
                "engine": name,
                "mode": mode,
                "tokens_per_s": statistics.median(speeds[mode]),
                "spread": f"{min(speeds[mode]):.1f}-{max(speeds[mode]):.1f}",
                "vs_none": f"{statistics.median(ratios):.3f}x",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--engines", default="hf-kv,hf-cb")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for name in args.engines.split(","):
        print(f"# {name}: {args.rounds} rounds x {len(MODES)} modes x {len(LOG_SPEED_PROMPTS)} prompts", flush=True)
        rows += asyncio.run(measure_engine(name, args.model, args.new_tokens, args.rounds))
    print(
        f"\nmodel {args.model}, batch 1, greedy, {args.new_tokens} new tokens, ignore_eos, the log's "
        f"{len(LOG_SPEED_PROMPTS)} prompts per round, {args.rounds} interleaved rounds; medians\n"
    )
    print(
        markdown_table(
            rows,
            ["engine", "mode", "tokens_per_s", "spread", "vs_none"],
            {"tokens_per_s": "tokens/s", "spread": "min-max tokens/s", "vs_none": "vs none (median ratio)"},
        )
    )


if __name__ == "__main__":
    main()
