"""Evaluation across a training run: ``make eval CHECKPOINTS=RUN_FOLDER``.

RUN_FOLDER holds the trainer's ``checkpoint-<step>`` folders and its ``trainer_state.json``.
For each checkpoint, in step order, the lm-eval tasks run through the server exactly as
``make eval`` runs them (loadtest/evaluation/driver.py, its server run only), and the
perplexity of a text comes from the server's ``Score`` (bench/checkpoint_eval.py's
windows and scoring).  One report: every metric by step in one table, a plot of each
metric against step, and the loss curve from the trainer's ``log_history`` beside them.
A checkpoint that fails to load is a row that says why; the others still run.

Each checkpoint gets servers of its own, started for it: the server has no way to swap
its weights, and a reload inside one process would save only the start-up of the process
(the imports, a few seconds on this CPU) while loading the new weights costs the same
either way; a fresh process also cannot carry anything from one checkpoint into the next.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from pathlib import Path

from bench import checkpoint_eval
from loadtest.evaluation import driver
from loadtest.evaluation.results import metric_values
from loadtest.measure.plots import pyplot
from loadtest.measure.report_folder import Report

DEFAULT_TEXT = Path(__file__).resolve().parent / "tasks" / "source.txt"
PERPLEXITY = "perplexity (Score)"


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_folder", help="a training output folder holding checkpoint-<step> folders")
    parser.add_argument("--engine", default="hf-kv")
    parser.add_argument("--tasks", default=driver.LOCAL_TAG, help="comma-separated lm-eval tasks, as make eval")
    parser.add_argument("--limit", type=float, default=None, help="documents per task (lm-eval's --limit)")
    parser.add_argument("--num-concurrent", type=int, default=1, help="lm-eval's requests in flight at once")
    parser.add_argument("--text", default=str(DEFAULT_TEXT), help="the text whose perplexity Score gives")
    parser.add_argument("--window", type=int, default=512, help="tokens per scored window")
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trust-remote-code", action="store_true", help="the checkpoints' own code runs")
    parser.add_argument("--serve-args", default="", help="more yayi-serve flags, one shell-quoted string")
    parser.add_argument("--out", help="report folder (default reports/eval-checkpoints-<UTC time>)")
    return parser.parse_args(argv)


def evaluate(step: int, path: Path, args, texts: list[str], out: Path) -> dict:
    """One checkpoint's row: its metrics, or why it has none."""
    row: dict = {"step": step, "checkpoint": path.name}
    started = time.perf_counter()
    serve = shlex.split(args.serve_args) + (["--trust-remote-code"] if args.trust_remote_code else [])
    eval_argv = ["--engine", args.engine, "--model", str(path), "--tasks", args.tasks, "--skip-in-process"]
    eval_argv += ["--device", args.device, "--num-concurrent", str(args.num_concurrent), "--out", str(out)]
    eval_argv += ["--limit", f"{args.limit:g}"] if args.limit is not None else []
    eval_argv += ["--serve-args", shlex.join(serve)] if serve else []
    try:
        driver.main(eval_argv)
        results = out / "raw" / "server_results.json"
        if not results.is_file():
            raise RuntimeError(_why(out) or "lm-eval wrote no results")
        for (task, metric, filter_name), value in sorted(metric_values(json.loads(results.read_text())).items()):
            row[_column(task, metric, filter_name)] = value
        total, count = checkpoint_eval.score_via_server(path, texts, args.device, args.engine, tuple(serve))
        row[PERPLEXITY] = math.exp(-total / count)
        row["status"] = "ok"
    except Exception as error:  # a checkpoint that cannot load or run is its own row; the others go on
        row["status"] = f"failed: {_first_line(error)}"
    row["wall_s"] = round(time.perf_counter() - started, 1)
    return row


def _column(task: str, metric: str, filter_name: str) -> str:
    return f"{task} {metric}" + ("" if filter_name == "none" else f" ({filter_name})")


def _why(out: Path) -> str:
    log = out / "raw" / "server.log"
    lines = log.read_text().splitlines() if log.is_file() else []
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [""])[-1].strip()


def _first_line(error: Exception) -> str:
    """The line that says why: a server's own ``yayi-serve: error:`` line when it exited, else the exception."""
    text = str(error)
    said = [line.strip() for line in text.splitlines() if "yayi-serve: error:" in line]
    if said:
        return said[-1].split("yayi-serve: error:", 1)[1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:300]


def score_texts(checkpoints: list[tuple[int, Path]], args) -> list[str]:
    """The text in windows, decoded back to text with the first checkpoint tokenizer that loads."""
    from transformers import AutoTokenizer

    for _, path in checkpoints:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
            break
        except Exception:  # a broken checkpoint: the next one's tokenizer (they share it)
            continue
    else:
        raise SystemExit(f"no checkpoint under {args.run_folder} has a tokenizer that loads")
    ids = tokenizer(Path(args.text).read_text(errors="replace"), add_special_tokens=False).input_ids
    return [tokenizer.decode(chunk) for chunk in checkpoint_eval.windows(ids, args.window, args.max_tokens)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(args.run_folder)
    checkpoints = checkpoint_eval.find_checkpoints(folder)
    report = Report("eval-checkpoints", args.out, "loadtest.evaluation.checkpoints", argv, device=args.device)
    report.text(__doc__.split("\n", 2)[2])
    texts = score_texts(checkpoints, args)
    print(f"# {len(checkpoints)} checkpoints of {folder}; tasks {args.tasks}; perplexity of {args.text}", flush=True)
    rows = []
    for step, path in checkpoints:
        rows.append(evaluate(step, path, args, texts, report.dir / "steps" / path.name))
        print(f"  step {step}: {rows[-1]['status']} ({rows[-1]['wall_s']} s)", flush=True)
    metrics = sorted({key for row in rows for key in row} - {"step", "checkpoint", "status", "wall_s"})
    columns = ["step", "checkpoint", *metrics, "status", "wall_s"]
    report.table(
        "metrics_by_step",
        rows,
        columns=columns,
        title=f"Every metric by step ({args.engine}; each checkpoint's lm-eval report is under steps/)",
    )
    state = checkpoint_eval.trainer_state_path(folder, checkpoints, None)
    curve = checkpoint_eval.loss_curve(state) if state else []
    if curve:
        report.table("loss_curve", curve, title=f"Loss curve from {state}")
    else:
        report.text("No trainer_state.json found: no loss curve.")
    plot(report, rows, metrics, curve)
    print(f"\nreport: {report.markdown_path}")
    return 0 if all(row["status"] == "ok" for row in rows) else 1


def plot(report: Report, rows: list[dict], metrics: list[str], curve: list[dict]) -> None:
    plt = pyplot()
    panels = len(metrics) + 1
    columns = min(3, panels)
    lines = math.ceil(panels / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(5 * columns, 3.8 * lines), squeeze=False)
    flat = [ax for line in axes for ax in line]
    for ax, metric in zip(flat, metrics, strict=False):
        points = [(row["step"], row[metric]) for row in rows if metric in row]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
        ax.set_title(metric, fontsize="small")
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    ax = flat[len(metrics)]
    for kind, style in (("train", "-"), ("eval", "s--")):
        points = [p for p in curve if p["kind"] == kind]
        if points:
            ax.plot([p["step"] for p in points], [p["loss"] for p in points], style, label=f"{kind} loss")
    ax.set_title("loss curve (trainer_state.json)", fontsize="small")
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    if curve:
        ax.legend(fontsize="small")
    for extra in flat[panels:]:
        extra.set_visible(False)
    fig.tight_layout()
    report.figure("metrics_by_step", fig, "Each metric against step, and the trainer's loss curve")


if __name__ == "__main__":
    raise SystemExit(main())
