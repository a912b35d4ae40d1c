"""What reading an HTTP request body costs: the typed pydantic requests against the hand-written reader
they replaced, from the JSON dict to ``SamplingParams``, per request.

The hand-written reader is taken from a git revision that still has it (``--old-rev``), so the two
run side by side in one process, interleaved round by round, so drifts of this noisy machine
hit both alike.  Bodies: a typical completions request and a typical chat request.

    PYTHONPATH=$PWD python -m bench.http_request_parse [--old-rev REV] [--rounds 15] [--calls 2000]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from server.http.protocol import generate_call

MODEL = "tiny-llama"
COMPLETION = {
    "model": MODEL,
    "prompt": "The quick brown fox jumps over the lazy dog because",
    "max_tokens": 128,
    "temperature": 0.7,
    "top_p": 0.95,
    "seed": 1234,
    "stop": ["\n\n", "###"],
    "stream": True,
    "stream_options": {"include_usage": True},
    "logprobs": None,
}
CHAT = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write one sentence about the sea."},
        {"role": "assistant", "content": "The sea is wide."},
        {"role": "user", "content": [{"type": "text", "text": "Another, please."}]},
    ],
    "max_completion_tokens": 64,
    "temperature": 0.2,
    "top_k": 40,
    "logprobs": True,
    "top_logprobs": 2,
    "stream": False,
}


def old_reader(revision: str) -> Callable:
    """``parse_generate`` as server/http/api.py had it at ``revision``."""
    source = subprocess.run(
        ["git", "show", f"{revision}:server/http/api.py"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "old_http_api.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_http_api", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_http_api"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module.parse_generate


def per_call_us(parse: Callable, body: dict, chat: bool, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        parse(body, MODEL, chat=chat)
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-rev", default="e6fcfda", help="a revision with the hand-written reader")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000, help="parses per round and reader")
    args = parser.parse_args()
    readers = {"hand-written": old_reader(args.old_rev), "pydantic": generate_call}
    bodies = {"completions": (COMPLETION, False), "chat": (CHAT, True)}
    for name, (body, chat) in bodies.items():
        old = readers["hand-written"](body, MODEL, chat=chat)
        new = readers["pydantic"](body, MODEL, chat=chat)
        assert (old.prompts, old.params, old.logprobs) == (new.prompts, new.params, new.logprobs), name
    times: dict[tuple[str, str], list[float]] = {(b, r): [] for b in bodies for r in readers}
    for round_number in range(args.rounds):
        order = list(readers.items())
        if round_number % 2:
            order.reverse()
        for body_name, (body, chat) in bodies.items():
            for reader_name, parse in order:
                times[body_name, reader_name].append(per_call_us(parse, body, chat, args.calls))
    print(f"\n{args.rounds} interleaved rounds of {args.calls} parses; microseconds per request body\n")
    print("| body | reader | median µs | min µs | max µs |")
    print("|---|---|---|---|---|")
    for (body_name, reader_name), values in times.items():
        print(
            f"| {body_name} | {reader_name} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} |"
        )


if __name__ == "__main__":
    main()
