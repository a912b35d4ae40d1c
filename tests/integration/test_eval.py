"""make eval: the local lm-eval task set, lm-eval's in-process hf model on it, lm-eval through
each engine's HTTP front end, and the driver end to end.

Everything serves tiny-llama (random weights: the figures mean nothing; that the server's
figures are the in-process model's is the point), over each task's first documents.  lm-eval
runs unchanged: its ``local-completions`` with its defaults (token-id prompts, echoed
log-probabilities for the scoring tasks), its ``hf`` model as the reference.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from engines.models import resolve_model
from loadtest import ROOT
from loadtest.evaluation.driver import (
    LOCAL_TAG,
    OFFLINE,
    hf_args,
    leaf_output_types,
    local_completions_args,
    served_model,
    task_manager,
)
from loadtest.evaluation.results import agreement, sample_differences
from loadtest.launch.server_process import ServerProcess
from server.grpc.wire import pb
from tests.helpers.eval_tasks import LOCAL_TASKS
from tests.helpers.marks import engine_param
from tests.helpers.servers import TINY_KV

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """lm-eval reads the task set's data files relative to the repository root, and nothing is fetched."""
    saved = {key: os.environ.get(key) for key in OFFLINE}
    os.environ.update(OFFLINE)
    cwd = os.getcwd()
    os.chdir(ROOT)
    yield
    os.chdir(cwd)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_the_local_task_set_loads_in_lm_eval(offline):
    manager = task_manager([LOCAL_TAG])
    assert set(LOCAL_TASKS) | {LOCAL_TAG} <= set(manager.all_tasks)
    tasks = manager.load([LOCAL_TAG])["tasks"]
    assert set(tasks) == set(LOCAL_TASKS)
    for name, (output_type, docs) in LOCAL_TASKS.items():
        assert tasks[name].OUTPUT_TYPE == output_type
        assert len(list(tasks[name].test_docs())) == docs
    assert leaf_output_types([LOCAL_TAG], manager) == {name: kind for name, (kind, _) in LOCAL_TASKS.items()}
    mc = next(iter(tasks["yayi_docs_mc"].test_docs()))
    assert len(mc["choices"]) == 4 and 0 <= mc["label"] < 4


LIMIT = 4  # documents per task in every run here


def lm_eval(model: str, model_args: dict, **options) -> dict:
    from lm_eval import simple_evaluate

    options = {"batch_size": 1, **options}
    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[LOCAL_TAG],
        task_manager=task_manager([LOCAL_TAG]),
        limit=LIMIT,
        bootstrap_iters=0,
        **options,
    )


class TinyInfo:
    """What GetModelInfo says of tiny-llama on a CPU (the in-process reference needs no server)."""

    dtype, device, max_context = "float32", "cpu", 1024


@pytest.fixture(scope="module")
def hf_reference(offline):
    """lm-eval's in-process hf model on tiny-llama over the local set's first documents: each engine is held to it."""
    return lm_eval("hf", hf_args(resolve_model("tiny-llama"), TinyInfo))


def test_lm_eval_in_process_hf_model_on_tiny_llama(hf_reference):
    results = hf_reference
    values = results["results"]
    assert 0 <= values["yayi_docs_mc"]["acc,none"] <= 1
    assert values["yayi_docs_copy"]["exact_match,strip"] == 0  # random weights copy nothing
    # A random model over a 49k vocabulary: each byte costs bits, each word hundreds of nats' worth.
    assert values["yayi_docs_ppl"]["bits_per_byte,none"] > 1
    assert math.isfinite(values["yayi_docs_ppl"]["word_perplexity,none"])

    rows = agreement(results, results)
    assert rows and all(row["agree"] for row in rows)
    differences = sample_differences(results["samples"], results["samples"])
    assert [d["docs_differing"] for d in differences] == [0, 0, 0]
    assert all(d["max_loglikelihood_gap"] in (0.0, None) for d in differences)

    shifted = json.loads(json.dumps({"results": values}, default=float))
    shifted["results"]["yayi_docs_ppl"]["word_perplexity,none"] *= 1.005  # within 1 %
    shifted["results"]["yayi_docs_ppl"]["byte_perplexity,none"] *= 1.02  # not
    shifted["results"]["yayi_docs_mc"]["acc,none"] += 0.25  # one document of four
    verdict = {(r["task"], r["metric"]): r["agree"] for r in agreement(shifted, results)}
    assert verdict[("yayi_docs_ppl", "word_perplexity")]
    assert not verdict[("yayi_docs_ppl", "byte_perplexity")]
    assert not verdict[("yayi_docs_mc", "acc")]
    assert verdict[("yayi_docs_mc", "acc_norm")]


def run_driver(out, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    command = [sys.executable, "-m", "loadtest.evaluation.driver", *TINY_KV[:4], "--out", str(out), *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)
    summary_path = out / "eval.json"
    assert summary_path.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(summary_path.read_text())


def assert_report(out, summary: dict, tasks: set[str]) -> None:
    assert {row["task"] for row in summary["agreement"]} == tasks
    assert summary["agree"], summary["agreement"]
    table = (out / "eval.md").read_text()
    assert "| task | metric | server | in-process (hf) | difference | rule | agree |" in table
    assert "| GPU-UTL (%), mean | CPU " in table  # on a CPU the GPU columns say what they measure
    assert summary["server"]["requests"].get("OK", 0) > 0
    assert summary["server"]["wall_s"] > 0 and summary["in_process_wall_s"] > 0
    for side in ("server", "in_process"):
        assert (out / "raw" / f"{side}_results.json").is_file()
        for task in tasks:
            assert (out / "raw" / f"{side}_samples_{task}.jsonl").is_file()
    assert (out / "raw" / "server.log").read_text().strip()


def test_driver_end_to_end_on_the_local_set(tmp_path):
    done, summary = run_driver(tmp_path, "--tasks", LOCAL_TAG, "--limit", str(LIMIT), "--num-concurrent", "4")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert summary["tokenized_requests"] is True  # lm-eval's default: prompts as token ids
    assert summary["blocked"] == {} and summary["support"]["echo"]
    assert_report(tmp_path, summary, set(LOCAL_TASKS))
    assert summary["server"]["generation_tokens"] > 0


# hf-cb gets several prompts per request (lm-eval's batch_size: a list of token-id lists, one
# choice each), vllm several requests at once.
@pytest.mark.parametrize(
    "engine, flags, options",
    [
        ("hf-cb", (), {"batch_size": 4, "num_concurrent": 2}),
        engine_param("vllm", ("--enforce-eager", "true"), {"batch_size": 1, "num_concurrent": 4}),
    ],
)
def test_lm_eval_through_each_engine_gives_the_in_process_figures(engine, flags, options, hf_reference):
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is installed by `make venv`; this skip only shows where it is not")
    server = ServerProcess(
        "--engine", engine, "--model", "tiny-llama", "--http-port", "0", "--dtype", "float32", *flags
    ).wait_ready(600)
    try:
        info = server.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
        model_args = local_completions_args(
            server.http_url,
            served_model(server.http_url),
            resolve_model("tiny-llama"),
            info,
            num_concurrent=options["num_concurrent"],
        )
        results = lm_eval("local-completions", model_args, batch_size=options["batch_size"])
    finally:
        server.stop()
    rows = agreement(results, hf_reference)
    assert {row["task"] for row in rows} == set(LOCAL_TASKS)
    assert all(row["agree"] for row in rows), [row for row in rows if not row["agree"]]
    differences = sample_differences(results["samples"], hf_reference["samples"])
    assert all(d["docs_differing"] == 0 for d in differences), differences
