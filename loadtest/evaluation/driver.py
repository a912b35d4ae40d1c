"""``make eval``: lm-evaluation-harness through our server, beside lm-eval's in-process model.

    python -m loadtest.evaluation.driver --engine hf-kv --model smollm2-135m --tasks yayi_local [--num-concurrent 8]

Starts ``yayi-serve`` with its HTTP front end on free ports, runs lm-eval's own
``local-completions`` model against ``/v1/completions`` (lm-eval's defaults: token-id prompts,
the model folder's tokenizer on the client), scraping ``/metrics`` throughout; stops the
server; runs the same tasks through lm-eval's in-process ``hf`` model on the same weights,
dtype and device; and writes ``reports/eval-<UTC time>/``: ``eval.md`` (the two runs side by
side, whether they agree, the server's tokens/s and memory), ``eval.json``, and lm-eval's own
results and per-document samples under ``raw/``.

Exit status: 0 when every metric agrees (accuracy equal, perplexity within 1 %), 1 when one
does not, 2 when the server refuses what a task needs (the report then holds the tasks that
could run, and names the others with the server's answer), 3 when a run failed part-way (the
report says where, and the server's log is under raw/).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engines.option_flags import flag_option, parse_config
from loadtest import ROOT
from loadtest.evaluation.results import agreement, metric_values, sample_differences
from loadtest.measure import scrape
from loadtest.measure.report_folder import Report

TASKS_DIR = ROOT / "loadtest" / "evaluation" / "tasks"
LOCAL_TAG = "yayi_local"
# lm-eval's request kinds that need log-probabilities of the prompt (echo) from the server.
SCORING_TYPES = frozenset({"loglikelihood", "loglikelihood_rolling", "multiple_choice"})
GAUGES = (
    "yayi_device_memory_used_bytes",
    "yayi_device_utilization_ratio",
    "yayi_device_power_watts",
    "yayi_requests_running",
    "yayi_requests_waiting",
)
# The lm-eval data files are named relative to the repository root, and nothing may be fetched.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
EXIT_DISAGREE, EXIT_BLOCKED, EXIT_FAILED = 1, 2, 3


@dataclass(frozen=True)
class Support:
    """What the server accepted of lm-eval's two request shapes, with its answer when it refused."""

    token_ids: bool
    token_ids_error: str
    echo: bool
    echo_error: str


def post_json(url: str, body: dict, timeout: float = 120.0) -> tuple[int, dict | str]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        try:
            return error.code, json.loads(text)
        except ValueError:
            return error.code, text


def _error_text(status: int, body: dict | str) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return f"{status} {body['error'].get('message', '')}".strip()
    return f"{status} {str(body)[:300]}"


TEXT_PROBE = "Hey, are you conscious? Can you talk to me?"


def served_model(http_url: str) -> str:
    with urllib.request.urlopen(f"{http_url}/v1/models", timeout=10) as response:
        return json.loads(response.read())["data"][0]["id"]


def probe(http_url: str, model: str, ids: list[int]) -> Support:
    """One request of each shape lm-eval sends, verbatim: a generation from token ids (a batch of
    one: a list holding one list of ids), and an echoed score of the same ids.  Both ask for one
    token, so the probe costs two forward passes."""
    url = f"{http_url}/v1/completions"
    generate = {"prompt": [ids], "model": model, "max_tokens": 1, "temperature": 0.0, "stop": ["\n"], "seed": 1234}
    status, body = post_json(url, generate)
    token_ids = status == 200
    token_ids_error = "" if token_ids else _error_text(status, body)
    prompt = [ids] if token_ids else TEXT_PROBE
    score = {"model": model, "prompt": prompt, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234}
    status, body = post_json(url, {**score, "echo": True})
    if status != 200:
        return Support(token_ids, token_ids_error, False, _error_text(status, body))
    problem = echo_shape_problem(body, len(ids) if token_ids else None)
    return Support(token_ids, token_ids_error, not problem, f"200 but {problem}" if problem else "")


def echo_shape_problem(body: dict | str, prompt_tokens: int | None) -> str:
    """What is wrong with an echoed answer as lm-eval reads it, or "" when nothing is.  lm-eval
    sums ``token_logprobs[ctxlen:-1]``: the prompt's entries, first one null, and then the one
    generated token's, which it drops; one entry short and it silently drops a prompt token."""
    try:
        logprobs = body["choices"][0]["logprobs"]
        values, top = logprobs["token_logprobs"], logprobs["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        return "no choices[0].logprobs.token_logprobs and top_logprobs"
    if prompt_tokens is not None and len(values) != prompt_tokens + 1:
        return (
            f"{len(values)} token_logprobs for {prompt_tokens} prompt tokens and 1 generated (want {prompt_tokens + 1})"
        )
    if len(top) != len(values):
        return f"{len(top)} top_logprobs beside {len(values)} token_logprobs"
    if values[0] is not None:
        return "the first prompt token has a logprob (want null: nothing precedes it)"
    if not all(isinstance(v, int | float) for v in values[1:]):
        return "a token after the first has no logprob"
    return ""


def local_names() -> set[str]:
    """The task and tag names the repo's task set defines (its YAML files hold no custom tags)."""
    import yaml

    names: set[str] = set()
    for path in TASKS_DIR.glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        names.add(config["task"])
        tags = config.get("tag", [])
        names.update([tags] if isinstance(tags, str) else tags)
    return names


def task_manager(names: list[str] | None = None):
    """lm-eval's task index with the local set; its own thousands of tasks are indexed (some
    20 s on this CPU) only when a name asked for is not local."""
    from lm_eval.tasks import TaskManager

    defaults = names is None or not set(names) <= local_names()
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=defaults)


def leaf_output_types(names: list[str], manager) -> dict[str, str]:
    """Each task the names expand to (groups and tags opened) and its lm-eval output type."""
    return {name: task.OUTPUT_TYPE for name, task in manager.load(names)["tasks"].items()}


def blocked_tasks(output_types: dict[str, str], support: Support, tokenized: bool) -> dict[str, str]:
    """Tasks the server cannot run as configured, each with the reason (the server's own answer)."""
    blocked = {}
    for task, kind in output_types.items():
        if tokenized and not support.token_ids:
            blocked[task] = f"token-id prompts refused: {support.token_ids_error}"
        elif kind in SCORING_TYPES and not support.echo:
            blocked[task] = f"echo with logprobs refused: {support.echo_error}"
    return blocked


def context(info) -> int:
    return info.max_context or 2048  # lm-eval's own default where a server reports none


def local_completions_args(
    http_url: str,
    model_name: str,
    folder: Path,
    info,
    tokenized: bool = True,
    num_concurrent: int = 1,
    tokenizer_backend: str = "huggingface",
) -> dict:
    """lm-eval's ``local-completions`` against our server, its defaults kept but two: the tokenizer
    backend is named (its "auto" picks /tokenize when the server has it, so a run's tokenizer
    would depend on the server), and max_length is the server's context, not lm-eval's 2048."""
    model_args = {
        "model": model_name,
        "base_url": f"{http_url}/v1/completions",
        "tokenizer_backend": tokenizer_backend,
        "tokenized_requests": tokenized,
        "num_concurrent": num_concurrent,
        "max_length": context(info),
    }
    if tokenizer_backend == "huggingface":
        model_args["tokenizer"] = str(folder)
    return model_args


def hf_args(folder: Path, info) -> dict:
    """lm-eval's in-process ``hf`` model on the weights, dtype and device the server reported.
    lm-eval's hf model scores windows of max_length tokens where its API model scores
    max_length - 2 (one kept for the generated token, one for context), so this keeps their
    rolling windows identical."""
    return {"pretrained": str(folder), "dtype": info.dtype, "device": info.device, "max_length": context(info) - 2}


def run_lm_eval(model: str, model_args: dict, tasks: list[str], config: EvalConfig, manager) -> tuple[dict, float]:
    from lm_eval import simple_evaluate

    started = time.perf_counter()
    results = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=manager,
        # The in-process side is lm-eval's plain reference: one document at a time.
        batch_size=config.batch_size if model != "hf" else 1,
        limit=config.limit,
        log_samples=True,
        bootstrap_iters=config.bootstrap_iters,
    )
    return results, time.perf_counter() - started


def write_raw(raw: Path, side: str, results: dict) -> None:
    from lm_eval.utils import handle_non_serializable

    raw.mkdir(parents=True, exist_ok=True)
    samples = results.get("samples", {})
    summary = {key: value for key, value in results.items() if key != "samples"}
    (raw / f"{side}_results.json").write_text(json.dumps(summary, indent=1, default=handle_non_serializable) + "\n")
    for task, rows in samples.items():
        with open(raw / f"{side}_samples_{task}.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n")


def server_figures(before: scrape.Samples, after: scrape.Samples, sampler: scrape.GaugeSampler, wall: float) -> dict:
    def delta(name: str) -> float | None:
        b, a = scrape.total(before, name), scrape.total(after, name)
        return None if a is None else a - (b or 0.0)

    prompt, generated = delta("yayi_prompt_tokens_total"), delta("yayi_generation_tokens_total")
    energy = delta("yayi_energy_joules_total")
    statuses = {
        status: count - scrape.by_label(before, "yayi_requests_total", "status").get(status, 0.0)
        for status, count in scrape.by_label(after, "yayi_requests_total", "status").items()
    }
    devices = {dict(series).get("device") for (name, series) in after if name == "yayi_device_memory_used_bytes"}
    mib = 2**20

    def scaled(value: float | None, factor: float) -> float | None:
        return None if value is None else value * factor

    return {
        "device": ",".join(sorted(d for d in devices if d)) or "n/a",
        "wall_s": wall,
        "requests": {k: int(v) for k, v in statuses.items() if v},
        "prompt_tokens": prompt,
        "generation_tokens": generated,
        "prompt_tokens_per_s": scaled(prompt, 1 / wall) if wall else None,
        "generation_tokens_per_s": scaled(generated, 1 / wall) if wall else None,
        "memory_mean_mb": scaled(sampler.mean("yayi_device_memory_used_bytes"), 1 / mib),
        "memory_max_mb": scaled(sampler.max("yayi_device_memory_used_bytes"), 1 / mib),
        "memory_peak_since_start_mb": scaled(scrape.total(after, "yayi_device_memory_peak_bytes"), 1 / mib),
        "utilization_mean_pct": scaled(sampler.mean("yayi_device_utilization_ratio"), 100),
        "power_mean_w": sampler.mean("yayi_device_power_watts"),
        "energy_j": energy,
        "requests_waiting_max": sampler.max("yayi_requests_waiting"),
    }


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def figure_rows(figures: dict, cpu: bool) -> list[dict]:
    """The server's figures as the report prints them: on a CPU the "GPU" figures say what they are."""
    util = figures["utilization_mean_pct"]
    power = figures["power_mean_w"]
    return [
        {"figure": "wall time (s)", "value": _num(figures["wall_s"])},
        {"figure": "requests by status", "value": ", ".join(f"{k} {v}" for k, v in figures["requests"].items())},
        {"figure": "prompt tokens", "value": _num(figures["prompt_tokens"], 0)},
        {"figure": "generated tokens", "value": _num(figures["generation_tokens"], 0)},
        {"figure": "prompt tokens/s", "value": _num(figures["prompt_tokens_per_s"])},
        {"figure": "generated tokens/s", "value": _num(figures["generation_tokens_per_s"])},
        {
            "figure": "Mem (MB): mean / max during the run, peak since start",
            "value": " / ".join(
                _num(figures[k], 0) for k in ("memory_mean_mb", "memory_max_mb", "memory_peak_since_start_mb")
            ),
        },
        {
            "figure": "GPU-UTL (%), mean",
            "value": ("n/a" if util is None else f"CPU {util:.0f}%") if cpu else _num(util),
        },
        {
            "figure": "Pwr_usg (W), mean",
            "value": ("n/a (no RAPL)" if cpu else "n/a") if power is None else _num(power),
        },
        {"figure": "energy (J)", "value": _num(figures["energy_j"])},
        {"figure": "most requests waiting at once", "value": _num(figures["requests_waiting_max"], 0)},
    ]


CPU_NOTE = (
    "On a CPU the device figures are the server's own: Mem is the resident memory of the server process "
    "and its children (psutil), GPU-UTL is the server's CPU share of the whole machine (all cores = 100 %), "
    "and power is RAPL package power where Linux exposes it, n/a where it does not (never 0)."
)


def format_value(value: float | None) -> str:
    return "—" if value is None else f"{value:.6g}"


def agreement_table(rows: list[dict]) -> list[dict]:
    return [
        {
            "task": r["task"],
            "metric": r["metric"] + ("" if r["filter"] == "none" else f" ({r['filter']})"),
            "server": format_value(r["server"]),
            "in_process": format_value(r["in_process"]),
            "difference": "—" if r["relative_difference"] is None else f"{r['relative_difference']:.2e}",
            "rule": r["rule"],
            "agree": "yes" if r["agree"] else "NO",
        }
        for r in rows
    ]


@dataclass(frozen=True)
class EvalConfig:
    """Everything the command line sets, built once from argv (engines/option_flags.py makes the parser)."""

    engine: str = flag_option("hf-kv", "the server's engine")
    model: str = flag_option("smollm2-135m", "a built-in model name or a local folder")
    tasks: str = flag_option(
        LOCAL_TAG, f"comma-separated lm-eval tasks, groups or tags ({LOCAL_TAG}: the repo's local set)"
    )
    num_concurrent: int = flag_option(1, "lm-eval's requests in flight at once", minimum=1)
    batch_size: int = flag_option(1, "prompts per HTTP request (lm-eval's batch_size)", minimum=1)
    limit: float | None = flag_option(None, "documents per task (lm-eval's --limit)", positive=True)
    tokenized_requests: str = flag_option(
        "auto",
        "send prompts as token ids (lm-eval's default, true) or text; auto: token ids when the "
        "server takes them, else text for generation tasks (the report says which)",
        choices=("auto", "true", "false"),
    )
    tokenizer_backend: str = flag_option(
        "huggingface",
        "huggingface: the model folder's tokenizer on the client; remote: the server's /tokenize",
        choices=("huggingface", "remote"),
    )
    dtype: str = flag_option("auto", "the server's --dtype; the in-process run uses what it chose")
    device: str = flag_option("auto", "the server's --device; the in-process run uses the same")
    serve_args: str = flag_option("", "more yayi-serve flags, one shell-quoted string")
    trust_remote_code: bool = flag_option(
        False,
        "the model folder's own code runs: in the server (yayi-serve --trust-remote-code) and in lm-eval's "
        "tokenizer and in-process model",
    )
    bootstrap_iters: int = flag_option(0, "lm-eval's stderr bootstrap (0: none)", minimum=0)
    skip_in_process: bool = flag_option(False, "only the server run (no agreement check)")
    out: str | None = flag_option(None, "report folder (default reports/eval-<UTC time>)")


def parse_args(argv: list[str] | None) -> EvalConfig:
    return parse_config(EvalConfig, argv, prog="loadtest.evaluation.driver", description=__doc__.splitlines()[0])


@dataclass
class Outcome:
    """What one ``make eval`` found, as the report writes it."""

    info: object  # the server's ModelInfo
    support: Support
    tokenized: bool
    blocked: dict[str, str]
    api_args: dict
    server_results: dict | None = None
    figures: dict | None = None
    hf_args: dict | None = None
    hf_results: dict | None = None
    hf_wall: float | None = None
    failures: dict[str, str] = field(default_factory=dict)  # run -> the exception that ended it


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    os.chdir(ROOT)
    from engines.models import resolve_model
    from loadtest.launch.server_process import ServerProcess
    from server.grpc.wire import pb

    folder = resolve_model(config.model)
    names = [n.strip() for n in config.tasks.split(",") if n.strip()]
    manager = task_manager(names)
    output_types = leaf_output_types(names, manager)
    report = Report("eval", config.out, "loadtest.evaluation.driver", argv)
    raw = report.dir / "raw"
    raw.mkdir(parents=True, exist_ok=True)

    serve = ["--engine", config.engine, "--model", config.model, "--http-port", "0"]
    serve += ["--dtype", config.dtype, "--device", config.device, *shlex.split(config.serve_args)]
    serve += ["--trust-remote-code"] if config.trust_remote_code else []
    print(f"# serving: yayi-serve {shlex.join(serve)}", flush=True)
    server = ServerProcess(*serve).wait_ready(900)
    try:
        info = server.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
        report.device = info.device  # the machine line names the device that really ran (a GPU's name)
        model_name = served_model(server.http_url)
        from transformers import AutoTokenizer

        own_code = {"trust_remote_code": True} if config.trust_remote_code else {}
        probe_ids = AutoTokenizer.from_pretrained(folder, **own_code)(TEXT_PROBE, add_special_tokens=False).input_ids
        support = probe(server.http_url, model_name, probe_ids)
        tokenized = {"true": True, "false": False}.get(config.tokenized_requests, support.token_ids)
        blocked = blocked_tasks(output_types, support, tokenized)
        runnable = [t for t in output_types if t not in blocked]
        api_args = (
            local_completions_args(
                server.http_url, model_name, folder, info, tokenized, config.num_concurrent, config.tokenizer_backend
            )
            | own_code
        )
        outcome = Outcome(info, support, tokenized, blocked, api_args)
        print(
            f"# server: {info.engine} {info.model} {info.dtype} on {info.device}, context {context(info)}", flush=True
        )
        print(f"# support: {support}", flush=True)
        for task, why in blocked.items():
            print(f"# blocked: {task}: {why}", flush=True)
        # Named as asked (a group keeps its aggregate) unless some of it cannot run.
        tasks = names if not blocked else runnable
        if runnable:
            metrics = scrape.metrics_url(server.metrics_port)
            before_text = scrape.fetch(metrics)
            started = time.perf_counter()
            with scrape.GaugeSampler(metrics, GAUGES, period=1.0) as sampler:
                try:
                    outcome.server_results, wall = run_lm_eval("local-completions", api_args, tasks, config, manager)
                except Exception as error:  # the report still says what the server did until then
                    outcome.failures["server"] = f"{type(error).__name__}: {error}"
                    wall = time.perf_counter() - started
            after_text = scrape.fetch(metrics)
            outcome.figures = server_figures(scrape.parse(before_text), scrape.parse(after_text), sampler, wall)
            (raw / "metrics_before.txt").write_text(before_text)
            (raw / "metrics_after.txt").write_text(after_text)
            if outcome.server_results:
                write_raw(raw, "server", outcome.server_results)
    finally:
        server.stop()
        (raw / "server.log").write_text("\n".join(server.lines) + "\n")

    if runnable and not config.skip_in_process:
        outcome.hf_args = hf_args(folder, info) | own_code
        print(f"# in-process: lm-eval hf {outcome.hf_args}", flush=True)
        try:
            outcome.hf_results, outcome.hf_wall = run_lm_eval("hf", outcome.hf_args, tasks, config, manager)
            write_raw(raw, "in_process", outcome.hf_results)
        except Exception as error:
            outcome.failures["in_process"] = f"{type(error).__name__}: {error}"
    return write_report(report, config, outcome)


def write_report(report: Report, config: EvalConfig, outcome: Outcome) -> int:
    info, figures = outcome.info, outcome.figures
    cpu = info.device.startswith("cpu")
    lines = [
        f"lm-eval {lm_eval_version()} `local-completions` against `yayi-serve --engine {info.engine} "
        f"--model {config.model}` ({info.dtype} on {info.device}, attention {info.attention}), "
        f"`num_concurrent={config.num_concurrent}`, `batch_size={config.batch_size}`, prompts sent as "
        f"{'token ids' if outcome.tokenized else 'text'}, tokenizer `{config.tokenizer_backend}`; beside it "
        f"lm-eval's in-process `hf` model on the same folder, dtype and device, batch size 1.",
    ]
    if config.tokenized_requests == "auto" and not outcome.tokenized:
        lines.append(
            "**Prompts went as text, not lm-eval's default token ids**: the server refused token-id prompts "
            f"(`{outcome.support.token_ids_error}`)."
        )
    report.text("\n\n".join(lines))
    rows = (
        agreement(outcome.server_results, outcome.hf_results) if outcome.server_results and outcome.hf_results else []
    )
    if rows:
        report.table(
            "agreement",
            agreement_table(rows),
            headers={"in_process": "in-process (hf)"},
            title="Each metric through the server and in process",
            note="Accuracy-like metrics must be equal; perplexities and bits per byte within 1 % (relative).",
        )
        report.table(
            "samples",
            sample_differences(outcome.server_results.get("samples", {}), outcome.hf_results.get("samples", {})),
            title="Where the two runs differ, document by document",
            note="A document differs when its score or generated answer does; the gap is the largest "
            "difference between the two runs' log-likelihoods for the same request (nats).",
        )
    elif outcome.server_results:
        values = metric_values(outcome.server_results)
        report.table(
            "server_metrics",
            [
                {"task": t, "metric": m, "filter": f, "server": format_value(v)}
                for (t, m, f), v in sorted(values.items())
            ],
            title="Through the server (no in-process run)",
        )
    if outcome.blocked:
        report.table(
            "blocked",
            [{"task": task, "why": why} for task, why in outcome.blocked.items()],
            title="Tasks the server could not run",
        )
    if figures:
        report.table(
            "runs",
            [
                {"run": "server (local-completions over HTTP)", "wall_s": f"{figures['wall_s']:.1f}"},
                {"run": "in process (hf)", "wall_s": "—" if outcome.hf_wall is None else f"{outcome.hf_wall:.1f}"},
            ],
            headers={"wall_s": "wall time (s)"},
            title="Wall time of each run",
            note="Each from lm-eval's start to its results: its set-up (tokenizer, tasks) included, and for "
            "the in-process run the model's loading; the server's start-up is not.",
        )
        report.table(
            "server",
            figure_rows(figures, cpu),
            title=f"The server during its run ({figures['device']}), from /metrics",
            note=CPU_NOTE if cpu else "",
        )
    disagree = [r for r in rows if not r["agree"]]
    if disagree:
        verdict = f"**{len(disagree)} of {len(rows)} metrics disagree.**"
    elif rows:
        verdict = f"All {len(rows)} metrics agree."
    else:
        verdict = "No agreement check: nothing ran on both sides."
    if outcome.blocked:
        verdict += f" **{len(outcome.blocked)} task(s) blocked by the server.**"
    for run, why in outcome.failures.items():
        verdict += f"\n\n**The {run.replace('_', '-')} run failed**: `{why}`."
    report.text(
        verdict + "\n\n`raw/`: lm-eval's results and per-document samples of each run, /metrics "
        "before and after the server's run, and the server's log."
    )
    summary = {
        "engine": info.engine,
        "model": config.model,
        "dtype": info.dtype,
        "device": info.device,
        "lm_eval_version": lm_eval_version(),
        "local_completions_args": outcome.api_args,
        "hf_args": outcome.hf_args,
        "support": asdict(outcome.support),
        "tokenized_requests": outcome.tokenized,
        "blocked": outcome.blocked,
        "agreement": rows,
        "server": figures,
        "in_process_wall_s": outcome.hf_wall,
        "failures": outcome.failures,
        "agree": bool(rows) and not disagree,
    }
    (report.dir / "eval.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(report.markdown_path.read_text())
    print(f"report: {report.markdown_path}", flush=True)
    if disagree:
        return EXIT_DISAGREE
    if outcome.failures:
        return EXIT_FAILED
    if outcome.blocked or (not rows and not config.skip_in_process):
        return EXIT_BLOCKED
    return 0


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


if __name__ == "__main__":
    sys.exit(main())
