"""The second clock: ``vllm bench serve`` (loadtest/compare/vllm_bench.py runs it) replays each target's
capacity point, the same prompts at the same rate and burstiness, with its ``--goodput`` set to the
target's terms, against our HTTP front end and each peer; the report says whether its goodput and ours
agree.  Its arrival instants are its own draw (it takes no trace), hence ``compare``'s definition."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

from loadtest.capacity.trace import Trace
from loadtest.compare.targets import HTTP_SUFFIX, TransformersServeTarget, YayiTarget

# The two clocks must agree within this share.
CLOCK_AGREEMENT = 0.05
# vllm bench serve's completions requests always carry repetition_penalty (vllm 0.32's
# benchmarks/lib/endpoint_request_func.py), a field transformers serve refuses.
TRANSFORMERS_SERVE_REFUSES = (
    "not clocked: vllm bench serve's requests carry repetition_penalty, which transformers serve refuses "
    "(422, Unexpected fields in the request)"
)


def wanted(choice: str) -> bool:
    if choice == "auto":
        return importlib.util.find_spec("vllm") is not None
    return choice == "true"


def burstiness(arrival: str, factor: float) -> str:
    """Our arrival process in vLLM's terms: gamma's shape, 1 for Poisson, infinity for constant gaps."""
    return {"poisson": "1", "constant": "inf"}.get(arrival, f"{factor:g}")


def dataset_rows(built: Trace, count: int) -> list[dict]:
    """The trace's first ``count`` requests as vllm bench serve's custom dataset: the same prompts and exact
    output lengths our clock sent at that rate, in the same order."""
    return [{"prompt": r.prompt, "output_tokens": r.output_tokens} for r in built.requests[:count]]


def bench_args(url: str, served: str, model_path: str, dataset: Path, count: int, rate: float, config, terms):
    """``vllm bench serve``'s arguments for one capacity point: our prompts (--dataset-name custom, no chat
    template, unshuffled), our rate and burstiness, its --goodput set to our terms."""
    unit = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2el"}
    return [
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", served,
        "--tokenizer", model_path, "--dataset-name", "custom", "--dataset-path", str(dataset),
        "--custom-output-len", "-1", "--skip-chat-template", "--disable-shuffle", "--num-prompts", str(count),
        "--request-rate", f"{rate:g}", "--burstiness", burstiness(config.arrival, config.burstiness),
        "--temperature", "0", "--seed", str(config.seed),
        "--goodput", *(f"{unit[t.metric]}:{t.bound_s * 1000:g}" for t in terms),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
    ]  # fmt: skip


def compare(ours: list[dict], result: dict, rate: float) -> dict:
    """The two clocks' goodput at one capacity point, each as the share of its requests that met every term
    times the offered rate.  Goodput over the run's own duration (each tool's raw figure, kept beside) also
    moves with the span of that run's random arrival draw, about 1/sqrt(n) of it, which is not the server's."""
    completed = result.get("completed") or 0
    sent = completed + (result.get("failed") or 0) or result.get("num_prompts") or completed
    good_theirs = (result.get("request_goodput") or 0.0) * (result.get("duration") or 0.0)
    row: dict = {
        "vllm_bench_good_pct": 100.0 * good_theirs / sent if sent else None,
        "vllm_bench_goodput_run_rps": result.get("request_goodput"),
        "vllm_bench_ttft_p99_s": (result.get("p99_ttft_ms") or 0) / 1000 or None,
        "vllm_bench_tpot_p99_s": (result.get("p99_tpot_ms") or 0) / 1000 or None,
    }
    if ours:
        row["ours_good_pct"] = statistics.median(r["good_pct"] for r in ours)
        row["ours_goodput_run_rps"] = statistics.median(r["goodput_run_rps"] for r in ours)
    if row.get("ours_good_pct") and row["vllm_bench_good_pct"] is not None:
        row["ours_goodput_rps"] = rate * row["ours_good_pct"] / 100
        row["vllm_bench_goodput_rps"] = rate * row["vllm_bench_good_pct"] / 100
        row["difference"] = row["vllm_bench_goodput_rps"] / row["ours_goodput_rps"] - 1
        row["agree"] = abs(row["difference"]) <= CLOCK_AGREEMENT
    return row


def run(runs, capacities: dict[str, float], config, terms, raw: Path, model_path: str, built: Trace) -> list[dict]:
    """``vllm bench serve`` at each target's capacity point, on the same prompts as our clock's step there."""
    from loadtest.compare.vllm_bench import run_client

    rows = []
    for run in runs:
        rate = capacities.get(run.label)
        if run.failed or not rate:
            continue
        if isinstance(run.target, YayiTarget) and run.target.api == "grpc" and run.label + HTTP_SUFFIX in capacities:
            continue  # its HTTP front end's own row is clocked instead
        if isinstance(run.target, TransformersServeTarget):
            rows.append({"target": run.label, "rate_rps": rate, "note": TRANSFORMERS_SERVE_REFUSES})
            continue
        served = run.target.model if isinstance(run.target, YayiTarget) else run.target.served_name
        ours = [r for r in run.rows if r.get("phase") == "search" and r.get("offered_rps") == rate and r.get("valid")]
        count = ours[0]["requests"] if ours else config.min_requests
        stem = f"{run.label}_vllm_bench_{rate:.4g}"
        dataset = raw / f"{stem}_prompts.jsonl"
        dataset.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in dataset_rows(built, count)))
        args = bench_args(run.target.openai_url, served, model_path, dataset, count, rate, config, terms)
        args += ["--save-result", "--result-dir", str(raw), "--result-filename", f"{stem}.json"]
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
        row.update(compare(ours, result, rate))
        rows.append(row)
    return rows
