"""make eval's parts without lm-eval or a server: the task data as the builder makes it, tasks a
server cannot run named with its answer, an echo answer checked as lm-eval reads it."""

from __future__ import annotations

import json

from loadtest.evaluation.driver import Support, blocked_tasks, echo_shape_problem
from loadtest.evaluation.tasks import build
from tests.helpers.eval_tasks import LOCAL_TASKS


def test_the_task_data_is_what_the_builder_makes(tmp_path):
    written = build.build(tmp_path)
    for name, path in written.items():
        assert path.read_bytes() == (build.DATA / path.name).read_bytes(), (
            f"{name}: rerun loadtest.evaluation.tasks.build"
        )
    copy_task = (build.HERE / "yayi_docs_copy.yaml").read_text()
    assert build.copy_example() in copy_task
    assert all(doc["sentence"] != build.copy_example() for doc in map(json.loads, written["yayi_docs_copy"].open()))


def test_tasks_the_server_cannot_run_are_named_with_its_answer():
    kinds = {name: kind for name, (kind, _) in LOCAL_TASKS.items()}
    no_echo = Support(True, "", False, "400 echo=true is not supported")
    assert blocked_tasks(kinds, no_echo, tokenized=True) == {
        "yayi_docs_mc": "echo with logprobs refused: 400 echo=true is not supported",
        "yayi_docs_ppl": "echo with logprobs refused: 400 echo=true is not supported",
    }
    no_ids = Support(False, "400 prompt must be one string", False, "400 no echo")
    assert set(blocked_tasks(kinds, no_ids, tokenized=True)) == set(kinds)
    assert set(blocked_tasks(kinds, no_ids, tokenized=False)) == {"yayi_docs_mc", "yayi_docs_ppl"}
    assert blocked_tasks(kinds, Support(True, "", True, ""), tokenized=True) == {}


def test_an_echo_answer_is_checked_as_lm_eval_reads_it():
    def answer(values):
        return {"choices": [{"index": 0, "logprobs": {"token_logprobs": values, "top_logprobs": [{}] * len(values)}}]}

    assert echo_shape_problem(answer([None, -1.0, -2.0, -0.5]), prompt_tokens=3) == ""
    # Without the generated token's entry lm-eval's [ctxlen:-1] would drop the prompt's last token.
    assert "want 4" in echo_shape_problem(answer([None, -1.0, -2.0]), prompt_tokens=3)
    assert "first prompt token" in echo_shape_problem(answer([-3.0, -1.0, -2.0, -0.5]), prompt_tokens=3)
    assert "no choices" in echo_shape_problem({"choices": [{"index": 0, "logprobs": None}]}, prompt_tokens=3)
