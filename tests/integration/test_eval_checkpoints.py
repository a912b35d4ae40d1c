"""Evaluation across a training run: three tiny checkpoints (one broken) and a trainer_state.json give one
report with every metric by step, its plots and the loss curve; and the repo's Chinese task in C-Eval's
format runs through the server with the figures of lm-eval's in-process model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from engines.models import resolve_model
from loadtest.launch.server_process import ROOT
from tests.helpers.servers import TINY_KV

STEPS = (100, 200, 300)
BROKEN = 200


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """checkpoint-<step> folders of tiny-llama, its weights nudged a little more at each step, and one whose
    weights file is not a safetensors file; trainer_state.json's log_history gives the loss curve."""
    import torch
    from transformers import AutoModelForCausalLM

    run = tmp_path_factory.mktemp("run")
    source = resolve_model("tiny-llama")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    torch.manual_seed(0)
    for step in STEPS:
        target = run / f"checkpoint-{step}"
        shutil.copytree(source, target)
        if step == BROKEN:
            (target / "model.safetensors").write_bytes(b"this training step's save was cut short")
            continue
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.01)
        model.save_pretrained(target)
    history = [
        {"step": s, "loss": 10.0 / (1 + s / 50), "epoch": s / 300, "learning_rate": 1e-4} for s in range(10, 301, 10)
    ]
    history += [{"step": s, "eval_loss": 9.0 / (1 + s / 60)} for s in STEPS]
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history, "global_step": 300}))
    return run


def test_a_sweep_writes_one_report_and_a_broken_checkpoint_is_its_own_row(run_folder, tmp_path):
    out = tmp_path / "report"
    command = [sys.executable, "-m", "loadtest.evaluation.checkpoints", str(run_folder), "--engine", "hf-kv"]
    command += ["--tasks", "yayi_ceval_zh,yayi_docs_mc", "--limit", "4", "--max-tokens", "200", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # one checkpoint failed
    rows = json.loads((out / "metrics_by_step.json").read_text())
    assert [row["step"] for row in rows] == list(STEPS)
    for row in rows:
        if row["step"] == BROKEN:
            assert row["status"].startswith("failed: ") and "perplexity (Score)" not in row
            assert "safetensors" in row["status"].lower() or "header" in row["status"].lower(), row["status"]
        else:
            assert row["status"] == "ok"
            assert 0 <= row["yayi_ceval_zh acc"] <= 1 and 0 <= row["yayi_docs_mc acc"] <= 1
            assert row["perplexity (Score)"] > 1
    good = [row["perplexity (Score)"] for row in rows if row["status"] == "ok"]
    assert good[0] != good[1], "each checkpoint is scored on its own weights"
    table = (out / "eval-checkpoints.md").read_text()
    assert "| step | checkpoint | perplexity (Score) | yayi_ceval_zh acc |" in table
    assert (out / "metrics_by_step.png").is_file() and (out / "loss_curve.csv").is_file()
    for step in STEPS:
        if step != BROKEN:
            assert (out / "steps" / f"checkpoint-{step}" / "raw" / "server_results.json").is_file()


def test_the_chinese_c_eval_format_task_agrees_with_lm_evals_in_process_model(tmp_path):
    command = [sys.executable, "-m", "loadtest.evaluation.driver", *TINY_KV, "--tasks", "yayi_ceval_zh"]
    done = subprocess.run(command + ["--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert summary["agree"] and {row["task"] for row in summary["agreement"]} == {"yayi_ceval_zh"}
    samples = (tmp_path / "raw" / "server_samples_yayi_ceval_zh.jsonl").read_text().splitlines()
    assert len(samples) == 12 and "答案：" in samples[0]  # the C-Eval prompt, Chinese kept as it is
