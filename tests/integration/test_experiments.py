"""Each offline experiment under bench/ run end to end at tiny sizes: files written, figures sane."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench import attention_kernels, cache_vs_length, checkpoint_eval, roofline_measure, rope_vs_alibi

pytestmark = pytest.mark.slow

TINY_SHAPE = {
    "name": "tiny",
    "architecture": "llama",
    "layers": 2,
    "hidden": 64,
    "heads": 4,
    "kv_heads": 2,
    "intermediate": 128,
    "vocab": 512,
    "source": "test",
}


def rows(folder: Path, stem: str) -> list[dict]:
    return json.loads((folder / f"{stem}.json").read_text())


def assert_report(folder: Path, experiment: str, tables: list[str], plots: list[str], module: str) -> None:
    page = (folder / f"{experiment}.md").read_text()
    assert f"python -m {module}" in page.split("\n\n")[1], "the exact command comes first"
    assert "Machine: cpu" in page and "torch" in page
    for stem in tables:
        assert (folder / f"{stem}.csv").stat().st_size > 0 and f"{stem}.csv" in page
    for stem in plots:
        assert (folder / f"{stem}.png").read_bytes()[:4] == b"\x89PNG" and f"{stem}.png" in page


def test_attention_kernels(tmp_path):
    attention_kernels.main(
        [
            "--seq",
            "32,64",
            "--heads",
            "2",
            "--head-dim",
            "16",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert_report(
        tmp_path,
        "attention",
        ["attention", "attention_summary"],
        ["attention_time", "attention_memory"],
        "bench.attention_kernels",
    )
    cells = rows(tmp_path, "attention")
    ran = [c for c in cells if "time_ms" in c]
    assert {c["impl"] for c in ran} >= {"eager", "sdpa-math", "sdpa-flash"}
    for cell in ran:
        limit = 1e-3 if cell["dtype"] == "float32" else 1e-2
        assert cell["status"] == "ok" and cell["rel_error"] < limit, cell
        assert cell["time_ms"] > 0 and cell["tflops"] > 0 and cell["peak_mib"] >= 0
    # a backend this machine lacks says so in its cell rather than vanishing or crashing
    cudnn = [c for c in cells if c["impl"] == "sdpa-cudnn"]
    assert cudnn and all(c["status"].startswith("cannot run") for c in cudnn)
    # the eager path holds the whole score matrix: it needs more memory than the flash kernel
    at = {(c["impl"], c["dtype"], c["seq"]): c for c in ran}
    assert at[("eager", "float32", 64)]["peak_mib"] > at[("sdpa-flash", "float32", 64)]["peak_mib"]


def test_cache_vs_length(tmp_path):
    cache_vs_length.main(
        [
            "--model",
            "tiny-llama",
            "--output-lengths",
            "8,16,32",
            "--eager-max-output",
            "16",
            "--prompt-lengths",
            "8,16",
            "--prompt-new-tokens",
            "3",
            "--out",
            str(tmp_path),
        ]
    )
    assert_report(
        tmp_path,
        "cache-vs-length",
        ["engines", "output_length", "prompt_length"],
        ["output_length", "prompt_length"],
        "bench.cache_vs_length",
    )
    out = rows(tmp_path, "output_length")
    by_engine = {e: [r for r in out if r["engine"] == e] for e in cache_vs_length.ENGINES}
    assert [r["output_tokens"] for r in by_engine["hf-eager"]] == [8, 16]  # capped by --eager-max-output
    assert [r["output_tokens"] for r in by_engine["hf-kv"]] == [8, 16, 32]
    for r in out:
        assert r["tokens_per_s"] > 0 and r["seconds"] > 0 and r["step_peak_mib"] > 0
        assert math.isfinite(r["growth_exponent"]) and math.isfinite(r["step_ms_per_token"])
    steps = rows(tmp_path, "steps")
    assert len(steps) == 16 + 32 + 32 and all(s["step_ms"] > 0 for s in steps)
    # the cache is counted: a cached step at 32 tokens holds more than one at 8
    kv = by_engine["hf-kv"]
    assert kv[-1]["step_peak_mib"] > kv[0]["step_peak_mib"]
    engines = {r["engine"]: r for r in rows(tmp_path, "engines")}
    assert engines["hf-eager"]["use_cache"] is False and engines["hf-kv"]["use_cache"] is True
    assert "sdpa-flash" in engines["hf-flash"]["attention kernel"]
    prompts = rows(tmp_path, "prompt_length")
    assert len(prompts) == 6 and all(r["prefill_peak_mib"] > 0 for r in prompts)


def test_token_speed(tmp_path):
    shape = tmp_path / "tiny.json"
    shape.write_text(json.dumps(TINY_SHAPE))
    out = tmp_path / "report"
    roofline_measure.main(
        [
            "--shapes",
            f"{shape},7b",
            "--measure",
            str(shape),
            "--prompts",
            "8,16",
            "--context",
            "8",
            "--decode-steps",
            "2",
            "--probe-seconds",
            "0.2",
            "--repeats",
            "1",
            "--batch",
            "1,2",
            "--out",
            str(out),
        ]
    )
    assert_report(
        out,
        "token-speed",
        ["shapes", "devices", "bounds", "measured", "log_row"],
        ["token_speed"],
        "bench.roofline_measure",
    )
    measured = rows(out, "measured")
    assert [(r["phase"], r["batch"]) for r in measured] == [
        ("prefill", 1),
        ("prefill", 1),
        ("decode", 1),
        ("decode", 2),
    ]
    for r in measured:
        assert r["measured_tok_s"] > 0 and r["bound_tok_s"] > 0 and math.isfinite(r["pct_of_bound"])
    log = [r for r in rows(out, "log_row") if r["model"] == "7b" and r["context"] == 0]
    assert log[0]["log % of bound"] == pytest.approx(100 * 30.76 / (2039e9 / (7_069_016_064 * 2)))
    bounds = rows(out, "bounds")
    assert {r["device"] for r in bounds} >= {"A100-80G SXM", "H100 SXM", "H200 SXM"}
    assert any(r["device"].startswith("this machine") for r in bounds)


def test_rope_vs_alibi(tmp_path):
    rope_vs_alibi.main(
        [
            "--speed-contexts",
            "16,32",
            "--speed-repeats",
            "1",
            "--train-length",
            "16",
            "--factors",
            "1,2,4",
            "--hidden",
            "32",
            "--layers",
            "1",
            "--heads",
            "2",
            "--steps",
            "4",
            "--batch",
            "4",
            "--saves",
            "2",
            "--train-bytes",
            "20000",
            "--eval-tokens",
            "512",
            "--out",
            str(tmp_path),
        ]
    )
    assert_report(
        tmp_path, "rope-vs-alibi", ["speed", "training", "extrapolation"], ["rope_vs_alibi"], "bench.rope_vs_alibi"
    )
    results = rows(tmp_path, "extrapolation")
    assert sorted((r["positions"], r["factor"]) for r in results) == sorted(
        (p, f) for p in ("RoPE", "ALiBi") for f in (1, 2, 4)
    )
    assert all(math.isfinite(r["perplexity"]) and 1 < r["perplexity"] < 1000 for r in results)
    training = rows(tmp_path, "training")
    assert [t["steps"] for t in training] == [4, 4]
    # same size by construction: within 2 % of each other
    assert training[0]["params"] == pytest.approx(training[1]["params"], rel=0.02)
    for arch in rope_vs_alibi.ARCHITECTURES:
        folder = tmp_path / "checkpoints" / arch
        assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    speed = rows(tmp_path, "speed")
    assert {r["positions"] for r in speed} == {"RoPE", "ALiBi"} and all(r["prefill_tok_s"] > 0 for r in speed)


def _two_checkpoints(folder: Path) -> None:
    """A tiny model saved twice, the later one after a change, plus a trainer_state.json."""
    tokenizer = rope_vs_alibi.byte_tokenizer()
    model = rope_vs_alibi.build("llama", 32, 1, 2, len(tokenizer), 128, seed=0)
    for step in (20, 5):  # written out of order: the table must sort by step
        model.save_pretrained(folder / f"checkpoint-{step}")
        tokenizer.save_pretrained(folder / f"checkpoint-{step}")
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
    history = [
        {"step": 1, "loss": 5.6, "epoch": 0.1},
        {"step": 5, "loss": 5.2, "epoch": 0.5},
        {"step": 5, "eval_loss": 5.3},
        {"step": 20, "loss": 4.9, "epoch": 2.0},
    ]
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": history, "global_step": 20}))


def test_checkpoint_eval(tmp_path):
    folder = tmp_path / "run"
    _two_checkpoints(folder)
    text = tmp_path / "text.txt"
    text.write_text("def main():\n    return sorted(range(10), key=lambda x: -x)\n" * 20)
    out = tmp_path / "report"
    checkpoint_eval.main([str(folder), "--text", str(text), "--window", "64", "--out", str(out)])
    assert_report(out, "checkpoint-eval", ["perplexity", "loss_curve"], ["checkpoints"], "bench.checkpoint_eval")
    table = rows(out, "perplexity")
    assert [r["step"] for r in table] == [5, 20]
    assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in table)
    assert table[0]["perplexity"] != table[1]["perplexity"]  # two different models
    curve = rows(out, "loss_curve")
    assert [(p["step"], p["kind"], p["loss"]) for p in curve] == [
        (1, "train", 5.6),
        (5, "train", 5.2),
        (5, "eval", 5.3),
        (20, "train", 4.9),
    ]


def test_checkpoint_eval_through_score_rpc_matches_direct(tmp_path):
    folder = tmp_path / "run"
    _two_checkpoints(folder)
    for extra in folder.glob("checkpoint-20"):
        import shutil

        shutil.rmtree(extra)  # one server start is enough to prove the path
    text = tmp_path / "text.txt"
    text.write_text("import os\nprint(os.getcwd())\n" * 10)
    direct, rpc = tmp_path / "direct", tmp_path / "rpc"
    checkpoint_eval.main([str(folder), "--text", str(text), "--window", "32", "--out", str(direct)])
    checkpoint_eval.main([str(folder), "--text", str(text), "--window", "32", "--via", "score", "--out", str(rpc)])
    a, b = rows(direct, "perplexity")[0], rows(rpc, "perplexity")[0]
    assert a["tokens"] == b["tokens"] and a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-4)
