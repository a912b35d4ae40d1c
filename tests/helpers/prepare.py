"""What the suite builds once, before it runs: ``make prepare`` (``python -m tests.helpers.prepare``).

Each step calls the function the tests themselves would call the first time, so the result
lands in the same cache and the test finds it there; nothing here is a second recipe:

- the built-in models (``engines.models.resolve_model``): SmolLM2 converted from its GGUF,
  tiny-llama and tiny-bloom built from their recipes;
- the GGUF files the llama-cpp tests serve (``engines.llama_cpp.gguf.resolve_gguf``, llama.cpp's
  own converter): tiny-llama at bfloat16 (the engine contract) and SmolLM2 at bfloat16
  (tests/integration/test_llama_cpp.py); skipped, with the reason, where llama.cpp is not built;
- matplotlib's font cache, built on its first import, which every report with a plot pays;
- torch.compile's cache for the compiled decode (tests/integration/test_compile.py): the same
  engines on the same buckets, started once, so inductor's on-disk cache holds their kernels.

A step that has nothing left to do returns at once, so a second run costs seconds. Each step
prints its time.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable

# The --compile configurations tests/integration/test_compile.py starts: its in-process pair and its server.
COMPILE_BUCKETS = "64,256"
SERVED_COMPILE_BUCKETS = "1024"
COMPILED = (("hf-kv", COMPILE_BUCKETS), ("hf-flash", COMPILE_BUCKETS), ("hf-kv", SERVED_COMPILE_BUCKETS))
# (model, dtype) of every GGUF the llama-cpp tests convert.
GGUFS = (("tiny-llama", "auto"), ("smollm2-135m", "bfloat16"))


def models() -> str:
    from engines.models import builtin_models, resolve_model

    return ", ".join(f"{name} at {resolve_model(name)}" for name in builtin_models())


def ggufs() -> str:
    from engines.errors import EngineUnavailable
    from engines.llama_cpp.gguf import resolve_gguf

    done = []
    for model, dtype in GGUFS:
        try:
            done.append(f"{model} ({dtype}) at {resolve_gguf(model, dtype).path}")
        except EngineUnavailable as exc:
            return f"skipped: {exc}"
    return ", ".join(done)


def fonts() -> str:
    from loadtest.measure.plots import pyplot

    pyplot().figure()
    return "matplotlib's font cache"


def compiled() -> str:
    from engines import EngineConfig, create_engine
    from engines.hf.engine import HFOptions

    async def start_and_stop(name: str, buckets: str) -> None:
        options = HFOptions(compile=True, compile_buckets=buckets)
        engine = create_engine(name, EngineConfig(model="tiny-llama", options=options))
        await engine.start()  # compiles the decode step for every bucket
        await engine.shutdown()

    for name, buckets in COMPILED:
        asyncio.run(start_and_stop(name, buckets))
    return ", ".join(f"{name} on buckets {buckets}" for name, buckets in COMPILED)


STEPS: dict[str, Callable[[], str]] = {"models": models, "gguf": ggufs, "fonts": fonts, "compile": compiled}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.helpers.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("steps", nargs="*", metavar="STEP", help=f"any of {', '.join(STEPS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [step for step in args.steps if step not in STEPS]
    if unknown:
        parser.error(f"unknown step {', '.join(unknown)}: the steps are {', '.join(STEPS)}")
    for step in args.steps or STEPS:
        start = time.monotonic()
        print(f"prepare {step} ...", flush=True)
        what = STEPS[step]()
        print(f"prepare {step}: {what} ({time.monotonic() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
