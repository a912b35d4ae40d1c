"""``yayi-compare``: the inference log's speed table (docs/design.md) as one command.

For each engine: start a server, wait for SERVING, warm up, record the idle row (the log's
"空载"), run headless Locust at each concurrency while watching the server's metrics, stop
the server.  With ``--apis grpc,http`` each engine is measured through both front ends (rows
"vllm" and "vllm-http"), on one server process, back to back, by the same Locust options and
the same clock.  Beside our engines, the same load against outside servers: vLLM's own
OpenAI-compatible server beside our vllm rows, ``transformers serve --continuous-batching``
beside our hf-cb rows (loadtest/targets.py).  Writes
reports/speed-<UTC time>/ (see loadtest/report.py and the folder rule in
loadtest/report_folder.py); every figure in it comes from a raw file kept under raw/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shlex
import sys
import time
from pathlib import Path

from loadtest.locust_run import LoadSpec, run_locust
from loadtest.machine import describe, machine_info
from loadtest.report import write_report
from loadtest.report_folder import default_out
from loadtest.roofline_column import RooflineColumn
from loadtest.tables import markdown_table
from loadtest.targets import (
    Reading,
    Target,
    TargetConfig,
    TransformersServeTarget,
    YayiTarget,
    baseline_target,
    chosen_baselines,
    parse_baselines,
    vllm_engine_args,
)
from loadtest.token_stats import LATENCY_FIELDS

# Rough start-up times on a 2-core CPU, only for the "time left" estimate.
START_ESTIMATE_S = {"vllm": 150.0, "vllm-openai": 150.0, "hf-cb": 40.0, "transformers-serve": 40.0}
DEFAULT_START_ESTIMATE_S = 20.0
STEP_OVERHEAD_S = 8.0
# The line of a failed start-up that says why: "yayi-serve: error: ...", "Value error, ...".
ERROR_LINE = re.compile(r"\b(?:[Ee]rror|Exception)\b[:,]")


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip().lower()
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 60s, 2m, 45)") from None


def parse_users(text: str) -> list[int]:
    try:
        users = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--users takes numbers separated by commas, got {text!r}") from None
    if not users or min(users) < 1:
        raise argparse.ArgumentTypeError("--users needs at least one concurrency, each 1 or more")
    return users


def parse_apis(text: str) -> list[str]:
    apis = [part.strip() for part in text.split(",") if part.strip()]
    if not apis or set(apis) - {"grpc", "http"}:
        raise argparse.ArgumentTypeError(f"--apis takes grpc, http or both separated by a comma, got {text!r}")
    return apis


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yayi-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--engines",
        default="hf-eager,hf-kv,hf-flash,vllm",
        help="comma-separated engines; empty with --baseline vllm-openai loads only vLLM's own server",
    )
    parser.add_argument("--model", default="smollm2-135m", help="built-in model name or local folder")
    parser.add_argument(
        "--apis",
        type=parse_apis,
        default=["grpc"],
        help="front ends each engine is measured through: grpc, http (the OpenAI-compatible one) or grpc,http",
    )
    parser.add_argument("--users", type=parse_users, default=[1, 4, 16], help="concurrencies, e.g. 1,4,16")
    parser.add_argument("--duration", type=parse_duration, default=60.0, help="load per step, e.g. 60s")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompts-file", default="", help="one prompt per line (default: the log's speed prompts)")
    parser.add_argument("--chat-template", action="store_true", help="wrap prompts in the model's chat template")
    parser.add_argument("--dtype", default="auto", help="hf engines' dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--vllm-dtype", default="bfloat16", help="dtype of the vllm engine and of vLLM's own server")
    parser.add_argument("--kv-cache-gb", type=float, default=1.0, help="vLLM's CPU KV cache (both vLLM servers)")
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context both vLLM servers serve (default: the model's, at most 2048, as our engine)",
    )
    parser.add_argument(
        "--baseline",
        type=parse_baselines,
        default="auto",
        help="outside servers loaded too: vllm-openai, transformers-serve (comma-separated), none, or auto: "
        "vLLM's own server when vllm is among the engines and installed, transformers serve when hf-cb is",
    )
    parser.add_argument(
        "--ignore-eos",
        choices=["auto", "true", "false"],
        default="auto",
        help="true: every request makes exactly --max-new-tokens; false: requests end at EOS; auto: true "
        "unless transformers-serve is loaded, which cannot ignore EOS (then false for every target)",
    )
    parser.add_argument("--server-args", default="", help="extra yayi-serve arguments for every engine, one string")
    parser.add_argument("--baseline-args", default="", help="extra arguments for vLLM's own server, one string")
    parser.add_argument(
        "--transformers-serve-args", default="", help="extra arguments for transformers serve, one string"
    )
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="how long the idle row is watched")
    parser.add_argument("--sample-period", type=float, default=1.0, help="seconds between device readings")
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=0.0,
        help="seconds requests in flight at the end of a step may finish (0: cut them)",
    )
    parser.add_argument(
        "--processes", type=int, default=1, help="Locust processes (for loads one process cannot drive)"
    )
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to load")
    parser.add_argument(
        "--probe-seconds",
        type=float,
        default=3.0,
        help="length of the CPU roofline probe per dtype; 0 skips it (no %% of bound on CPU)",
    )
    parser.add_argument("--out", default="", help="report folder (default reports/speed-<UTC time>)")
    return parser


class Progress:
    """Which engine, which step, about how long is left: the driver runs for many minutes."""

    def __init__(self, plan: list[tuple[str, int]], duration_s: float, idle_s: float) -> None:
        self.plan, self.duration_s, self.idle_s = plan, duration_s, idle_s
        self.done = 0

    def remaining_s(self) -> float:
        left = 0.0
        for label, users in self.plan[self.done :]:
            if users == 0:
                left += START_ESTIMATE_S.get(label, DEFAULT_START_ESTIMATE_S) + self.idle_s
            else:
                left += self.duration_s + STEP_OVERHEAD_S
        return left

    def step(self, label: str, what: str) -> None:
        minutes = self.remaining_s() / 60
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        print(
            f"[{stamp}] step {min(self.done + 1, len(self.plan))}/{len(self.plan)} · {label} · {what} · "
            f"about {minutes:.0f} min left",
            file=sys.stderr,
            flush=True,
        )

    def skip(self, label: str) -> None:
        self.done = max(self.done, max(i for i, (name, _) in enumerate(self.plan) if name == label) + 1)


def target_config(args: argparse.Namespace, model_path: str) -> TargetConfig:
    """The command line's part the targets need, typed: the one place a Namespace is read for them."""
    return TargetConfig(
        model=args.model,
        model_path=model_path,
        dtype=args.dtype,
        vllm_dtype=args.vllm_dtype,
        kv_cache_gb=args.kv_cache_gb,
        max_model_len=args.max_model_len,
        sample_period=args.sample_period,
        baseline_args=tuple(shlex.split(args.baseline_args)),
        transformers_serve_args=tuple(shlex.split(args.transformers_serve_args)),
    )


def make_targets(args, engines: list[str], model_path: str, raw: Path) -> list[Target]:
    queue = max(64, 2 * max(args.users))
    common = shlex.split(args.server_args)
    config = target_config(args, model_path)
    targets: list[Target] = []
    for engine in engines:
        extra = vllm_engine_args(config) if engine == "vllm" else ["--dtype", args.dtype]
        previous = None
        for api in args.apis:
            # The second front end of an engine is measured on the first one's server, right after it.
            previous = YayiTarget(
                engine, args.model, extra + common, queue, args.sample_period, api, shares_with=previous
            )
            targets.append(previous)
    for name in chosen_baselines(args.baseline, engines):
        targets.append(baseline_target(name, config, raw))
    return targets


def ignores_eos(args, targets: list) -> bool:
    """--ignore-eos auto: exactly --max-new-tokens per request, unless a target cannot be told to ignore
    EOS (transformers serve): then every target honours it, so all do the same work."""
    if args.ignore_eos != "auto":
        return args.ignore_eos == "true"
    return not any(isinstance(target, TransformersServeTarget) for target in targets)


def reading_fields(reading: Reading) -> dict:
    gpu = reading.device.startswith("cuda")
    return {
        "mem_mb": reading.memory_peak_bytes / 2**20 if reading.memory_peak_bytes is not None else None,
        "util_pct": reading.utilization_mean * 100 if reading.utilization_mean is not None else None,
        "util_source": "GPU" if gpu else "CPU",
        "power_w": reading.power_mean_w,
        "power_source": ("NVML" if gpu else "RAPL")
        if reading.power_mean_w is not None
        else ("no NVML power" if gpu else "no RAPL"),
        "energy_j": reading.energy_j,
    }


def base_row(model: str, target, info: dict) -> dict:
    return {
        "model": model,
        "engine": target.label,
        "use_cache": info.get("use_cache"),
        "dtype": info.get("dtype", ""),
        "device": info.get("device", ""),
        "attention": info.get("attention", ""),
    }


def load_row(row: dict, users: int, summary: dict, reading: Reading, raw_prefix: Path, out: Path) -> dict:
    tokens = summary["output_tokens"]
    row.update(reading_fields(reading))
    row.update(
        {
            "users": users,
            "speed_tokens_per_s": summary["output_tokens_per_s"],
            "requests_per_s": summary["requests_per_s"],
            "per_user_tokens_per_s": summary["per_user_tokens_per_s"],
            **{
                key: summary[key]
                for key in (
                    *LATENCY_FIELDS,
                    "requests_ok",
                    "requests_cut",
                    "duration_s",
                    "failures_by_status",
                )
            },
            "errors": summary["requests_failed"],
            "client_tokens": tokens,
            "server_tokens": reading.server_tokens,
            "j_per_token": reading.energy_j / tokens if reading.energy_j is not None and tokens else None,
            "raw": str(raw_prefix.relative_to(out)),
        }
    )
    notes = [row["attention"]] if row.get("attention") else []
    if row.get("dtype"):
        notes.append(row["dtype"])
    if summary["requests_cut"]:
        notes.append(f"{summary['requests_cut']} cut at the end")
    if summary["failures_by_status"]:
        notes.append(f"failures {summary['failures_by_status']}")
    if reading.server_tokens is not None and reading.server_tokens != tokens:
        notes.append(f"server counted {reading.server_tokens:.0f} tokens, client {tokens}")
    row["notes"] = "; ".join(notes)
    return row


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    started = dt.datetime.now()
    out = Path(args.out) if args.out else default_out("speed")
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    from engines.models import resolve_model

    model_path = str(resolve_model(args.model))

    targets = make_targets(args, engines, model_path, raw)
    plan = [(t.label, users) for t in targets for users in [0, *args.users]]
    progress = Progress(plan, args.duration, args.idle_seconds)
    roofline = RooflineColumn(model_path, context=16 + args.max_new_tokens // 2)
    if args.probe_seconds > 0:
        progress.step("roofline", "probing this machine's bandwidth and FLOP/s")
        roofline.probe({args.vllm_dtype, args.dtype, "float32"} - {"auto"}, args.probe_seconds)

    eos_ignored = ignores_eos(args, targets)
    load = dict(
        max_new_tokens=args.max_new_tokens,
        ignore_eos=eos_ignored,
        prompts_file=args.prompts_file,
        chat_template=args.chat_template,
        stop_timeout_s=args.stop_timeout,
        processes=args.processes,
    )
    rows, failures = [], []
    for target in targets:
        progress.step(target.label, "starting the server")
        info = {}
        try:
            info = target.start(args.start_timeout)
            target.warm_up()
            # The utilisation gauge covers the last sample period: let the warm-up leave it first.
            time.sleep(2 * args.sample_period + 0.5)
            with target.watch(raw / f"{target.label}_idle") as watch:
                time.sleep(args.idle_seconds)
            rows.append(
                {
                    **base_row(args.model, target, info),
                    "users": 0,
                    **reading_fields(watch.reading),
                    "notes": "idle (空载): loaded, no requests",
                    "raw": f"raw/{target.label}_idle",
                }
            )
            progress.done += 1
            for users in args.users:
                progress.step(target.label, f"{users} users for {args.duration:g} s")
                prefix = raw / f"{target.label}_u{users}"
                with target.watch(prefix) as watch:
                    spec = LoadSpec(users, args.duration, **load)
                    summary = run_locust(target.locustfile, target.host, spec, prefix, target.locust_args())
                row = load_row(base_row(args.model, target, info), users, summary, watch.reading, prefix, out)
                roofline.fill(row)
                rows.append(row)
                progress.done += 1
        except Exception as exc:  # one engine's failure must not cost the others their rows
            reason = str(exc).strip().splitlines()
            detail = reason[0] if reason else type(exc).__name__
            why = next((line.strip() for line in reversed(reason) if ERROR_LINE.search(line)), detail)
            failures.append(f"{target.label}: {why}")
            rows.append(
                {**base_row(args.model, target, info), "users": 0, "failed": True, "notes": f"did not run: {why}"}
            )
            (raw / f"{target.label}_failure.txt").write_text(f"{exc}\n\n{target.startup_output()}")
            progress.skip(target.label)
            print(f"  {target.label} failed: {why}", file=sys.stderr, flush=True)
        finally:
            target.stop()

    context = {
        "model": args.model,
        "model_path": model_path,
        "command": "yayi-compare " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": describe(machine_info()),
        "users": args.users,
        "duration_s": args.duration,
        "max_new_tokens": args.max_new_tokens,
        "failures": failures,
        "roofline": roofline.describe(),
        "column_notes": column_notes(args, eos_ignored),
    }
    paths = write_report(out, rows, context)
    versus = api_comparison(rows)
    if versus:
        text = (
            "# gRPC against the HTTP front end\n\nThe same engine, load and prompts; "
            "HTTP's figures over gRPC's (1.00: the same).\n\n" + markdown_table(versus) + "\n"
        )
        (out / "api_comparison.md").write_text(text)
        print(text, flush=True)
    print(f"report: {paths[0]}", flush=True)
    return 0 if not failures else 1


def api_comparison(rows: list[dict]) -> list[dict]:
    """For each engine measured through both front ends: HTTP's tokens/s and TTFT p50 over gRPC's, per step."""
    loaded = {(r["engine"], r["users"]): r for r in rows if r.get("users") and r.get("speed_tokens_per_s")}
    out = []
    for (engine, users), http in loaded.items():
        grpc = loaded.get((engine.removesuffix("-http"), users)) if engine.endswith("-http") else None
        if grpc is None:
            continue
        out.append(
            {
                "Engine": grpc["engine"],
                "Users": users,
                "tokens/s gRPC": grpc["speed_tokens_per_s"],
                "tokens/s HTTP": http["speed_tokens_per_s"],
                "tokens/s HTTP/gRPC": http["speed_tokens_per_s"] / grpc["speed_tokens_per_s"],
                "TTFT p50 gRPC (ms)": grpc["ttft_p50_ms"],
                "TTFT p50 HTTP (ms)": http["ttft_p50_ms"],
                "ITL p50 gRPC (ms)": grpc["itl_p50_ms"],
                "ITL p50 HTTP (ms)": http["itl_p50_ms"],
            }
        )
    return out


def column_notes(args, eos_ignored: bool) -> list[str]:
    length = (
        f"exactly {args.max_new_tokens} new tokens (ignore_eos)"
        if eos_ignored
        else f"up to {args.max_new_tokens} new tokens, ending at EOS (transformers serve cannot ignore it)"
    )
    return [
        f"Load: each user sends the prompts in turn, greedy, {length}, "
        f"no pause between requests, for {args.duration:g} s per step; Users is the concurrency.",
        "Speed: output tokens over the step (first request sent to last token received), all users together; "
        "tokens of requests cut by the end of the step count, their latencies do not.",
        "Mem: peak of the server's memory during the step: on CPU the resident memory of the server process "
        "and its children (vLLM's engine runs in children), on CUDA the GPU memory NVML reports.",
        "GPU-UTL: on CPU the server's CPU time as a share of all cores of the machine (`CPU n%`), mean over the step.",
        "Pwr_usg: mean NVML power on CUDA, RAPL package power on CPU where readable, else n/a; J/token from the "
        "energy counter over the step.",
        "TTFT, ITL and E2E percentiles are measured by the Locust client per request (raw/*_tokens.csv).",
        "% of bound: Speed over the decode roofline bound for this model on this device at batch = Users "
        "(engines that do not batch are still measured against the batched bound).",
        "vllm-openai: vLLM's own OpenAI-compatible server, same prompts and load through streaming /v1/completions.",
        "transformers-serve: `transformers serve MODEL_DIR --continuous-batching` with hf-cb's KV cache (blocks, "
        "block size, tokens per step), same prompts and load through streaming /v1/completions; it sends usage "
        "only at the end, so each text chunk counts as a token as it arrives and the final usage adds the rest.",
        "ENGINE-http (hf-kv-http, vllm-http): the engine through our OpenAI-compatible front end (--http-port), "
        "with the same streaming /v1/completions load and client as vllm-openai; a bare engine name is gRPC.",
    ]


if __name__ == "__main__":
    sys.exit(main())
