"""The second clock: ``vllm bench serve`` (loadtest/compare/vllm_bench.py runs it) replays each target's
capacity point, its rate and burstiness, with its ``--goodput`` set to the target's terms, against our
HTTP front end and each peer; the report says whether its goodput and ours agree."""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path

from loadtest.compare.targets import HTTP_SUFFIX, YayiTarget

# The two clocks must agree within this share.
CLOCK_AGREEMENT = 0.05


def wanted(choice: str) -> bool:
    if choice == "auto":
        return importlib.util.find_spec("vllm") is not None
    return choice == "true"


def burstiness(arrival: str, factor: float) -> str:
    """Our arrival process in vLLM's terms: gamma's shape, 1 for Poisson, infinity for constant gaps."""
    return {"poisson": "1", "constant": "inf"}.get(arrival, f"{factor:g}")


def run(runs, capacities: dict[str, float], config, terms, raw: Path, model_path: str) -> list[dict]:
    """``vllm bench serve`` at each target's capacity point, with its ``--goodput`` set to the target's
    terms (its goodput is per request, over the whole run: compared with ours counted the same way)."""
    from loadtest.compare.vllm_bench import run_client

    rows = []
    unit_ms = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2el"}
    goodput = [f"{unit_ms[t.metric]}:{t.bound_s * 1000:g}" for t in terms]
    prompt_tokens = _mean_prompt_tokens(model_path)
    for run in runs:
        rate = capacities.get(run.label)
        if run.failed or not rate:
            continue
        if isinstance(run.target, YayiTarget) and run.target.api == "grpc" and run.label + HTTP_SUFFIX in capacities:
            continue  # its HTTP front end's own row is clocked instead
        served = run.target.model if isinstance(run.target, YayiTarget) else run.target.served_name
        ours = [r for r in run.rows if r.get("phase") == "search" and r.get("offered_rps") == rate and r.get("valid")]
        count = ours[0]["requests"] if ours else config.min_requests
        stem = f"{run.label}_vllm_bench_{rate:.4g}"
        args = [
            "--backend", "openai", "--base-url", run.target.openai_url, "--endpoint", "/v1/completions",
            "--model", served, "--tokenizer", model_path, "--dataset-name", "random",
            "--random-input-len", str(prompt_tokens), "--random-output-len", str(config.output_tokens),
            "--random-range-ratio", "0", "--num-prompts", str(count), "--request-rate", f"{rate:g}",
            "--burstiness", burstiness(config.arrival, config.burstiness),
            "--temperature", "0", "--seed", str(config.seed), "--goodput", *goodput,
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
            "--save-result", "--result-dir", str(raw), "--result-filename", f"{stem}.json",
        ]  # fmt: skip
        if run.ignore_eos:
            args.append("--ignore-eos")
        row = {"target": run.label, "rate_rps": rate, "requests": count}
        try:
            result = run_client(args, raw / f"{stem}.log", timeout=config.request_timeout_s * 4 + count / rate)
        except Exception as exc:
            row["note"] = f"vllm bench serve failed: {str(exc).splitlines()[0]}"[:300]
            rows.append(row)
            continue
        if not result.get("completed"):
            row["note"] = f"vllm bench serve: every request failed ({stem}.log says why)"
            rows.append(row)
            continue
        ours_goodput = statistics.median(r["goodput_run_rps"] for r in ours) if ours else None
        theirs = result.get("request_goodput")
        row.update(
            ours_goodput_rps=ours_goodput,
            vllm_bench_goodput_rps=theirs,
            vllm_bench_rps=result.get("request_throughput"),
            vllm_bench_ttft_p99_s=(result.get("p99_ttft_ms") or 0) / 1000 or None,
        )
        if ours_goodput and theirs is not None:
            row["difference"] = theirs / ours_goodput - 1
            row["agree"] = abs(row["difference"]) <= CLOCK_AGREEMENT
        rows.append(row)
    return rows


def _mean_prompt_tokens(model_path: str) -> int:
    """vllm bench's random prompts as long as the speed prompts, in the model's tokens."""
    from loadtest.capacity.workloads import load_tokenizer
    from loadtest.measure.prompts import LOG_SPEED_PROMPTS

    tokenizer = load_tokenizer(model_path)
    counts = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in LOG_SPEED_PROMPTS]
    return max(1, round(sum(counts) / len(counts)))
