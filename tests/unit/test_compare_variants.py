"""yayi-compare --variant without a server: one engine twice under two labels, its flags on the
variant's server only, the variant set beside its engine, and bad specs refused in one line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from loadtest.compare.driver import api_comparison, make_targets, parse_args, run_plan, run_versus
from loadtest.compare.report import markdown_report
from loadtest.compare.rounds import aggregate_all
from loadtest.compare.schedule import components, target_dtype
from loadtest.compare.targets import VLLMServerTarget, chosen_baselines
from loadtest.compare.variants import Variant

PP2 = "vllm-pp2=vllm --pipeline-parallel-size 2"
# --max-model-len given: the vllm flags are then set up without reading a model's config.
BASE = ["--model", "tiny-llama", "--baseline", "none", "--max-model-len", "512"]


def parsed(*argv: str):
    return parse_args([*BASE, *argv])


def refusal(capsys, *argv: str) -> str:
    """The one line yayi-compare's parser exits with."""
    with pytest.raises(SystemExit) as exit_info:
        parsed(*argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_variant_is_its_engine_with_more_flags_under_its_own_label(tmp_path):
    args = parsed("--engines", "vllm,vllm-pp2", "--variant", PP2, "--server-args", "--max-concurrency 8")
    assert args.engine_names == ["vllm", "vllm-pp2"]
    assert args.variant == (Variant("vllm-pp2", "vllm", ("--pipeline-parallel-size", "2")),)
    plain, pp2 = make_targets(args, tmp_path)
    assert (plain.label, plain.engine, pp2.label, pp2.engine) == ("vllm", "vllm", "vllm-pp2", "vllm")
    # The same flags as the plain engine's (vllm's matched dtype, cache and context, --server-args), then its own.
    assert pp2.server_args == [*plain.server_args, "--pipeline-parallel-size", "2"]
    assert plain.server_args[:2] == ["--dtype", "bfloat16"] and "--max-concurrency" in plain.server_args
    assert "--pipeline-parallel-size" not in plain.server_args
    assert (plain.note, pp2.note) == ("", "variant: vllm --pipeline-parallel-size 2")


def test_a_variants_flag_wins_over_the_same_flag_given_before_it(tmp_path):
    args = parsed("--engines", "hf-kv,hf-kv-bf16", "--variant", "hf-kv-bf16=hf-kv --dtype bfloat16")
    plain, bf16 = make_targets(args, tmp_path)
    assert (target_dtype(plain), target_dtype(bf16)) == ("float32", "bfloat16")


def test_each_front_end_of_a_variant_is_labelled_apart(tmp_path):
    args = parsed("--engines", "vllm-pp2", "--variant", PP2, "--apis", "grpc,http")
    grpc, http = make_targets(args, tmp_path)
    assert (grpc.label, http.label) == ("vllm-pp2", "vllm-pp2-http") and http.shares_with is grpc
    assert http.server_args[-4:] == ["--pipeline-parallel-size", "2", "--http-port", "0"]
    rows = [
        {"engine": "vllm-pp2", "users": 4, "speed_tokens_per_s": 100.0, "ttft_p50_ms": 1.0, "itl_p50_ms": 1.0},
        {"engine": "vllm-pp2-http", "users": 4, "speed_tokens_per_s": 90.0, "ttft_p50_ms": 1.0, "itl_p50_ms": 1.0},
    ]
    assert [(r["Engine"], r["tokens/s HTTP/gRPC"]) for r in api_comparison(rows)] == [("vllm-pp2", 0.9)]
    # Its start is its engine's (minutes for vllm), not the default of an unknown label; the second
    # front end's server is already up.
    plan = run_plan([grpc, http], args, set())
    assert plan[0] == ("vllm-pp2", 150.0) and plan[2 + len(args.users)] == ("vllm-pp2-http", 0.0)


def test_a_variant_is_set_beside_its_engine_not_beside_the_engines_outside_peer():
    args = parsed("--engines", "vllm,vllm-pp2", "--variant", PP2)
    versus = run_versus(args)
    pairs = [(ours, theirs) for ours, theirs, _ in versus]
    assert ("vllm-pp2", "vllm") in pairs and ("vllm", "vllm-openai") in pairs
    assert not any(ours == "vllm-pp2" and theirs != "vllm" for ours, theirs in pairs)
    # Up together with its engine (and so with the engine's peer), interleaved round by round.
    labels = [SimpleNamespace(label=name) for name in ("hf-kv", "vllm", "vllm-openai", "vllm-pp2")]
    assert components(labels, versus) == [[0], [1, 2, 3]]
    # --baseline auto starts vLLM's own server for the vllm engine, not for a variant alone.
    assert "vllm-openai" not in chosen_baselines("auto", ["vllm-pp2"])


def test_the_report_holds_the_variant_against_its_engine():
    args = parsed("--engines", "vllm,vllm-pp2", "--variant", PP2)

    def step(engine, number, seq, speed):
        return {"model": "m", "engine": engine, "users": 4, "round": number, "seq": seq, "clock": "locust"} | {
            "speed_tokens_per_s": speed,
            "ttft_p50_ms": 5.0,
        }

    rounds = [step("vllm", 1, 1, 100.0), step("vllm-pp2", 1, 2, 80.0), step("vllm", 2, 3, 100.0)]
    rounds.append(step("vllm-pp2", 2, 4, 90.0))
    rows = list(aggregate_all(rounds).values())
    context = {"model": "m", "command": "c", "started": "s", "finished": "f", "machine": "here", "repeat": 2}
    text = markdown_report(rows, {**context, "versus": run_versus(args), "column_notes": []}, [], rounds, [])
    assert "## vllm-pp2 (`vllm --pipeline-parallel-size 2`) against vllm (the same engine without those flags)" in text
    assert "| 4 | 85.0 | 100.0 | 0.85 | 0.80–0.90 | 2 | vllm faster |" in text
    # A report written before variants (no "versus" in its context) still renders its usual pairs.
    assert "against vllm" not in markdown_report(rows, {**context, "column_notes": []}, [], rounds, [])


def test_the_second_clock_stays_with_the_outside_pairs(tmp_path):
    from loadtest.compare.driver import clock_pairs

    args = parsed("--engines", "vllm,vllm-pp2", "--variant", PP2)
    peer = object.__new__(VLLMServerTarget)
    labels = [SimpleNamespace(label=name) for name in ("vllm", "vllm-pp2")]
    assert clock_pairs([*labels, peer], run_versus(args)) == [("vllm", "vllm-openai")]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--engines", "vllm,vllm-pp3", "--variant", PP2], "'vllm-pp3' is neither an engine"),
        (["--engines", "vllm-pp2"], "'vllm-pp2' is neither an engine"),
        (["--variant", "pp2=vlm --pipeline-parallel-size 2"], "unknown engine 'vlm'"),
        (["--variant", "vllm=vllm --pipeline-parallel-size 2"], "label 'vllm' already names an engine"),
        (["--variant", "vllm-openai=vllm"], "label 'vllm-openai' already names an engine or an outside server"),
        (["--variant", "pp2-http=vllm"], "ending in '-http'"),
        (["--variant", "pp2 vllm"], "takes LABEL=ENGINE"),
        (["--variant", "a/b=hf-kv"], "a label is letters, digits"),
        (["--variant", "a=hf-kv", "--variant", "a=hf-kv --max-concurrency 2"], "--variant a is defined twice"),
        (["--variant", "a=hf-kv --kv-cache-gb 2"], "--kv-cache-gb is not an option of engine hf-kv"),
        (["--variant", "a=hf-kv --max-concurency 2"], "unrecognized arguments: --max-concurency 2"),
        (["--variant", "a=hf-kv --engine hf-cb"], "may not set --engine or --model"),
    ],
)
def test_a_bad_variant_is_refused_in_one_line(capsys, argv, says):
    line = refusal(capsys, *argv)
    assert line.startswith("yayi-compare: error: ") and says in line, line
