"""What exporting metrics costs: tokens/s with metrics off and on (``make bench-metrics``).

Both servers run side by side (an idle server costs nothing but its 1 Hz device
sampler) and the requests alternate between them, so drifts of this noisy machine hit
both sides alike.  The target is at most 3 % apart.
"""

from __future__ import annotations

import argparse
import statistics

from bench.engine_speed import measure, speed
from loadtest.launch.server_process import ServerProcess
from loadtest.measure.prompts import LOG_SPEED_PROMPTS
from loadtest.measure.tables import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="hf-kv")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    common = ("--engine", args.engine, "--model", args.model)
    servers = {
        "metrics off": ServerProcess(*common, "--metrics-port", "-1").wait_ready(900),
        "metrics on": ServerProcess(*common).wait_ready(900),
    }
    rates: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for server in servers.values():
            measure(server, "Warm-up", 8)
        for round_number in range(args.rounds):
            for prompt in LOG_SPEED_PROMPTS:
                order = list(servers.items())
                if round_number % 2:
                    order.reverse()
                for name, server in order:
                    rates[name].append(speed(measure(server, prompt, args.new_tokens)))
            print(f"# round {round_number + 1}/{args.rounds} done", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    off, on = (statistics.median(rates[name]) for name in ("metrics off", "metrics on"))
    print(
        f"\n{args.engine} on {args.model}, {args.new_tokens} tokens, {len(rates['metrics on'])} requests each, "
        "alternating, median tokens/s\n"
    )
    print(
        markdown_table(
            [
                {
                    "metrics": name,
                    "tokens/s (median)": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                }
                for name, values in rates.items()
            ]
        )
    )
    print(f"\nmetrics on / off: {on / off:.3f} ({(on / off - 1) * 100:+.1f} %)")


if __name__ == "__main__":
    main()
