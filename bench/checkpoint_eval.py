"""Perplexity of every checkpoint in a folder on a text file, and the trainer's loss curve.

Finds the Hugging Face ``checkpoint-<step>`` folders under a training folder, scores the
same text with each (non-overlapping windows of ``--window`` tokens, so any length of
text fits any context), and writes perplexity against step.  ``--via score`` goes
through the server: one ``yayi-serve --engine hf-kv`` per checkpoint, the text sent to
its ``Score`` RPC window by window; ``--via direct`` (the default) runs the same
arithmetic in-process: exp of the mean negative log-likelihood of each token given the
ones before it in its window.

The loss curve comes from the trainer's ``trainer_state.json`` (the folder's own, or the
latest checkpoint's): training loss, and evaluation loss where the trainer logged one,
drawn against step with the checkpoints' log-perplexity (the same units: nats per token)
beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from loadtest.measure.plots import pyplot
from loadtest.measure.report_folder import Report

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def find_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    if not found:
        raise SystemExit(f"no checkpoint-<step> folders under {folder}")
    return sorted(found)


def trainer_state_path(folder: Path, checkpoints: list[tuple[int, Path]], given: str | None) -> Path | None:
    if given:
        return Path(given)
    candidates = [folder / "trainer_state.json"] + [p / "trainer_state.json" for _, p in reversed(checkpoints)]
    return next((c for c in candidates if c.is_file()), None)


def loss_curve(state_path: Path) -> list[dict]:
    history = json.loads(state_path.read_text()).get("log_history", [])
    points = []
    for entry in history:
        for key, kind in (("loss", "train"), ("eval_loss", "eval")):
            if key in entry and "step" in entry:
                points.append(
                    {
                        "step": entry["step"],
                        "kind": kind,
                        "loss": float(entry[key]),
                        "epoch": entry.get("epoch"),
                        "learning_rate": entry.get("learning_rate"),
                    }
                )
    return points


def windows(ids: list[int], window: int, max_tokens: int | None) -> list[list[int]]:
    ids = ids[:max_tokens] if max_tokens else ids
    return [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) >= 2]


def score_direct(path: Path, chunks: list[list[int]], device: str) -> tuple[float, int]:
    """In process, through the same scoring code the server's Score runs (engines/hf/model.py)."""
    from engines.hf.model import HFModel

    lm = HFModel.load(path, "float32", device, use_cache=False)
    results = [lm.score_ids(chunk) for chunk in chunks]
    return sum(r.total_logprob for r in results), sum(r.token_count for r in results)


def score_via_server(
    path: Path, texts: list[str], device: str, engine: str = "hf-kv", serve_args: tuple[str, ...] = ()
) -> tuple[float, int]:
    """The texts' summed log-probability and token count from one server's Score RPC on the checkpoint."""
    from loadtest.launch.server_process import ServerProcess
    from server.grpc.wire import pb

    server = ServerProcess(
        "--engine",
        engine,
        "--model",
        str(path),
        "--metrics-port",
        "-1",
        "--device",
        device,
        "--dtype",
        "float32",
        *serve_args,
    ).wait_ready(600)
    try:
        total, count = 0.0, 0
        for text in texts:
            reply = server.stub.Score(pb.ScoreRequest(text=text), timeout=600)
            total += reply.total_logprob
            count += reply.token_count
        return total, count
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a training output folder holding checkpoint-<step> folders")
    parser.add_argument("--text", required=True, help="the text file to score")
    parser.add_argument(
        "--via",
        choices=("direct", "score"),
        default="direct",
        help="in-process, or the server's Score RPC (one server per checkpoint)",
    )
    parser.add_argument("--tokenizer", help="where the tokenizer is, if the checkpoints lack one (direct only)")
    parser.add_argument("--window", type=int, default=512, help="tokens per scored window (at most the context)")
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens")
    parser.add_argument(
        "--trainer-state", help="trainer_state.json (default: the folder's, else the latest checkpoint's)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="report folder (default reports/checkpoint-eval-<time>)")
    args = parser.parse_args(argv)
    from tqdm import tqdm
    from transformers import AutoTokenizer

    folder = Path(args.folder)
    checkpoints = find_checkpoints(folder)
    report = Report("checkpoint-eval", args.out, "bench.checkpoint_eval", argv, device=args.device)
    report.text(__doc__.split("\n", 2)[2])
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or checkpoints[-1][1])
    ids = tokenizer(Path(args.text).read_text(errors="replace"), add_special_tokens=False).input_ids
    chunks = windows(ids, args.window, args.max_tokens)
    print(
        f"# {len(checkpoints)} checkpoints, {sum(map(len, chunks))} tokens of {args.text} in {len(chunks)} "
        f"windows of up to {args.window}, via {args.via}",
        flush=True,
    )
    rows = []
    for step, path in tqdm(checkpoints, desc="checkpoints", unit="ckpt"):
        if args.via == "score":
            total, count = score_via_server(path, [tokenizer.decode(c) for c in chunks], args.device)
        else:
            total, count = score_direct(path, chunks, args.device)
        row = {
            "step": step,
            "checkpoint": path.name,
            "tokens": count,
            "nll_per_token": -total / count,
            "perplexity": math.exp(-total / count),
        }
        rows.append(row)
        tqdm.write(f"  step {step:6d}: perplexity {row['perplexity']:.3f} over {count} tokens")
    report.table(
        "perplexity",
        rows,
        headers={"nll_per_token": "NLL (nats/token)"},
        title=f"Perplexity of each checkpoint on {Path(args.text).name} (via {args.via})",
    )
    state = trainer_state_path(folder, checkpoints, args.trainer_state)
    curve = loss_curve(state) if state else []
    if curve:
        report.table("loss_curve", curve, title=f"Loss curve from {state}")
    else:
        report.text("No trainer_state.json found: no loss curve.")
    plot(report, rows, curve)
    print(f"\nreport: {report.markdown_path}")


def plot(report: Report, rows: list[dict], curve: list[dict]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    ax.plot([r["step"] for r in rows], [r["perplexity"] for r in rows], "o-")
    ax.set_xlabel("step")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title("checkpoint perplexity on the text")
    ax.grid(True, alpha=0.3)
    ax = axes[1]
    for kind, style in (("train", "-"), ("eval", "s--")):
        points = [p for p in curve if p["kind"] == kind]
        if points:
            ax.plot([p["step"] for p in points], [p["loss"] for p in points], style, label=f"{kind} loss (trainer)")
    ax.plot([r["step"] for r in rows], [r["nll_per_token"] for r in rows], "o", label="checkpoint NLL on the text")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loss curve")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    report.figure("checkpoints", fig, "Perplexity against step, and the trainer's loss curve")


if __name__ == "__main__":
    main()
