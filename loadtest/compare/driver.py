"""``yayi-compare``: the inference log's speed table (docs/design.md) as one command.

Start the servers, wait for SERVING, warm up, record each one's idle row (the log's "空载"),
then run headless Locust at each concurrency while watching each server's metrics, and stop
them.  ``--repeat N`` runs every step N times with the servers of a group interleaved (A B C,
A B C, ...), so a ratio is taken between rounds minutes apart rather than between one target's
whole sweep and the next one's; every server stays up across its rounds (loadtest/compare/schedule.py
says which are up together, loadtest/compare/rounds.py what the report says from the rounds).  With
``--apis grpc,http`` each engine is measured through both front ends (rows "vllm" and
"vllm-http") on one server process.  ``--variant LABEL=ENGINE [flags...]`` puts one engine in the
run again under LABEL with more yayi-serve flags (loadtest/compare/variants.py), e.g. vllm at PP 2 beside
vllm at PP 1.  Beside our engines, the same load against outside servers:
vLLM's own OpenAI-compatible server beside our vllm rows, ``transformers serve
--continuous-batching`` twice beside our hf-cb rows, once with hf-cb's KV cache and once left to
its own defaults, and llama.cpp's own ``llama-server`` beside our llama-cpp rows, on the same GGUF
and threads (loadtest/compare/targets/).  ``--second-client guidellm`` has an outside client drive
the same steps against our HTTP front end and each peer, a second clock for the ratios
(loadtest/compare/second_clock.py).  Writes reports/speed-<UTC time>/ (see loadtest/compare/report.py and the
folder rule in loadtest/measure/report_folder.py); every figure in it comes from a raw file under raw/.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import re
import shlex
import sys
import time
from pathlib import Path

from loadtest.compare import second_clock
from loadtest.compare.config import CompareConfig
from loadtest.compare.config import build_parser as config_parser
from loadtest.compare.config import parse_args as parse_config
from loadtest.compare.locust_run import LoadSpec, run_locust
from loadtest.compare.report import VERSUS, write_report
from loadtest.compare.rounds import aggregate_all
from loadtest.compare.rows import ClockRow, SpeedRow
from loadtest.compare.schedule import Group, memory_budget, plan_groups, target_dtype, target_estimate
from loadtest.compare.targets import (
    HTTP_SUFFIX,
    OutsideServerTarget,
    Reading,
    Target,
    TargetConfig,
    TransformersServeTarget,
    YayiTarget,
    baseline_target,
    chosen_baselines,
    vllm_engine_args,
)
from loadtest.compare.variants import Variant, by_label, variant_pairs
from loadtest.measure.machine import describe, machine_info
from loadtest.measure.prompts import load_prompts
from loadtest.measure.report_folder import default_out
from loadtest.measure.roofline_column import RooflineColumn
from loadtest.measure.tables import markdown_table
from loadtest.measure.token_stats import LATENCY_FIELDS

DESCRIPTION = __doc__.split("\n\n")[0]

# Rough start-up times on a 2-core CPU by engine or outside server, only for the "time left" estimate.
START_ESTIMATE_S = {
    "vllm": 150.0,
    "vllm-openai": 150.0,
    "vllm-openai-matched": 150.0,
    "hf-cb": 40.0,
    "transformers-serve-matched": 40.0,
    "transformers-serve-defaults": 60.0,
    "llama-cpp": 10.0,
    "llama-server": 5.0,
    "llama-server-defaults": 5.0,
}
DEFAULT_START_ESTIMATE_S = 20.0
STEP_OVERHEAD_S = 8.0
CLOCK_OVERHEAD_S = 20.0  # guidellm's start (torch, the tokenizer, its workers) and its statistics
# The line of a failed start-up that says why: "yayi-serve: error: ...", "Value error, ...".
ERROR_LINE = re.compile(r"\b(?:[Ee]rror|Exception)\b[:,]")


def build_parser() -> argparse.ArgumentParser:
    """yayi-compare's parser, one flag per CompareConfig field (loadtest/compare/config.py)."""
    return config_parser(DESCRIPTION)


class Progress:
    """Which target, which step, about how long is left: the driver runs for many minutes.

    ``plan`` is every step the run will take, as (label, estimated seconds), in any order: the count
    and the time left are read from what is not done yet."""

    def __init__(self, plan: list[tuple[str, float]]) -> None:
        self.plan = plan
        self.left = list(range(len(plan)))

    def remaining_s(self) -> float:
        return sum(self.plan[i][1] for i in self.left)

    def step(self, label: str, what: str) -> None:
        minutes = self.remaining_s() / 60
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        number = len(self.plan) - len(self.left) + 1
        print(
            f"[{stamp}] step {min(number, len(self.plan))}/{len(self.plan)} · {label} · {what} · "
            f"about {minutes:.0f} min left",
            file=sys.stderr,
            flush=True,
        )

    def done(self, label: str) -> None:
        """The next step of ``label`` is done."""
        mine = [i for i in self.left if self.plan[i][0] == label]
        if mine:
            self.left.remove(mine[0])

    def skip(self, label: str) -> None:
        """Every step of ``label`` still to come is dropped (its server failed)."""
        self.left = [i for i in self.left if self.plan[i][0] != label]


def parse_args(argv: list[str] | None = None) -> CompareConfig:
    """The command line as a CompareConfig, built once; see loadtest/compare/config.py."""
    return parse_config(argv, DESCRIPTION)


def run_versus(config: CompareConfig) -> list[tuple[str, str, str]]:
    """The pairs this run's report may set side by side: report.VERSUS and each variant over its engine."""
    return [*VERSUS, *variant_pairs(config.variant)]


def http_twins(versus, targets: list) -> list[tuple[str, str, str]]:
    """Each pair of ours against an outside server again with our HTTP row (``--apis ...,http``): both
    then answer the same Locust user over the same wire (streamed /v1/completions), so the ratio holds no
    difference of client or protocol, only of the servers."""
    labels, outside = target_labels(targets)
    return [
        (f"{ours}{HTTP_SUFFIX}", theirs, f"{title}, both through HTTP (streamed `/v1/completions`)")
        for ours, theirs, title in versus
        if theirs in outside and f"{ours}{HTTP_SUFFIX}" in labels
    ]


def target_labels(targets: list) -> tuple[set[str], set[str]]:
    """Every target's label, and those of the outside servers among them."""
    return {t.label for t in targets}, {t.label for t in targets if isinstance(t, OutsideServerTarget)}


def start_estimate(target) -> float:
    """Seconds to start, by engine (a variant and an HTTP row are their engine); nothing for the second
    front end of a server already up."""
    if getattr(target, "shares_with", None) is not None:
        return 0.0
    kind = getattr(target, "engine", None) or target.label
    return START_ESTIMATE_S.get(kind, DEFAULT_START_ESTIMATE_S)


def run_plan(targets: list, config: CompareConfig, clock_labels: set[str]) -> list[tuple[str, float]]:
    plan = []
    for target in targets:
        plan.append((target.label, start_estimate(target)))
        plan.append((target.label, config.idle_seconds))
        plan += [(target.label, config.duration + STEP_OVERHEAD_S)] * (len(config.users) * config.repeat)
        if target.label in clock_labels:
            plan += [(target.label, config.duration + CLOCK_OVERHEAD_S)] * (len(config.users) * config.repeat)
    return plan


def target_config(config: CompareConfig) -> TargetConfig:
    """The part of the run's config the targets are set up from (the model's folder already resolved)."""
    return TargetConfig(
        model=config.model,
        model_path=config.model_path,
        dtype=config.dtype,
        vllm_dtype=config.vllm_dtype,
        kv_cache_gb=config.kv_cache_gb,
        max_model_len=config.max_model_len,
        sample_period=config.sample_period,
        baseline_args=tuple(shlex.split(config.baseline_args)),
        transformers_serve_args=tuple(shlex.split(config.transformers_serve_args)),
        transformers_serve_defaults_args=tuple(shlex.split(config.transformers_serve_defaults_args)),
        server_args=tuple(shlex.split(config.server_args)),
        llama_server_args=tuple(shlex.split(config.llama_server_args)),
    )


def make_targets(config: CompareConfig, raw: Path) -> list[Target]:
    queue = max(64, 2 * max(config.users))
    common = shlex.split(config.server_args) + (["--trust-remote-code"] if config.trust_remote_code else [])
    setup = target_config(config)
    targets: list[Target] = []
    baselines = chosen_baselines(config.baseline, config.engine_names)
    versus = run_versus(config)
    clocked = {ours for ours, theirs, _ in versus if theirs in baselines} if config.second_client != "none" else set()
    variants = by_label(config.variant)
    for name in config.engine_names:
        variant: Variant | None = variants.get(name)
        engine = variant.engine if variant else name
        extra = vllm_engine_args(setup) if engine == "vllm" else ["--dtype", config.dtype]
        if name in clocked and config.apis == ("grpc",):
            extra += ["--http-port", "0"]  # the second clock reaches our engine through the HTTP front end
        # A variant's flags come last: where it repeats a flag given above, its value is the one taken.
        server_args = extra + common + list(variant.args if variant else ())
        note = f"variant: {variant.describe()}" if variant else ""
        previous = None
        for api in config.apis:
            # The second front end of an engine is measured on the first one's server, right after it.
            previous = YayiTarget(
                engine,
                config.model,
                server_args,
                queue,
                config.sample_period,
                api,
                shares_with=previous,
                name=name,
                note=note,
            )
            targets.append(previous)
    for name in baselines:
        targets.append(baseline_target(name, setup, raw))
    return targets


def clock_pairs(targets: list, versus=VERSUS) -> list[tuple[str, str]]:
    """The (ours, peer) pairs the second clock measures: each compared pair whose peer is an outside server."""
    labels, outside = target_labels(targets)
    return [(ours, theirs) for ours, theirs, _ in versus if ours in labels and theirs in outside]


def ignores_eos(config: CompareConfig, targets: list) -> bool:
    """--ignore-eos auto: exactly --max-new-tokens per request, unless a target cannot be told to ignore
    EOS (transformers serve): then every target honours it, so all do the same work."""
    if config.ignore_eos != "auto":
        return config.ignore_eos == "true"
    return not any(isinstance(target, TransformersServeTarget) for target in targets)


def reading_fields(reading: Reading) -> SpeedRow:
    gpu = reading.device.startswith("cuda")
    return {
        "mem_mb": reading.memory_peak_bytes / 2**20 if reading.memory_peak_bytes is not None else None,
        "util_pct": reading.utilization_mean * 100 if reading.utilization_mean is not None else None,
        "util_source": "GPU" if gpu else "CPU",
        "power_w": reading.power_mean_w,
        "power_source": ("NVML" if gpu else "RAPL")
        if reading.power_mean_w is not None
        else ("no NVML power" if gpu else "no RAPL"),
        "energy_j": reading.energy_j,
    }


def base_row(model: str, target, info: dict) -> SpeedRow:
    row: SpeedRow = {
        "model": model,
        "engine": target.label,
        "use_cache": info.get("use_cache"),
        "dtype": info.get("dtype", ""),
        "device": info.get("device", ""),
        "attention": info.get("attention", ""),
        # What the server loaded (a GGUF file for llama-cpp and llama-server): the roofline reads its bytes.
        "model_path": info.get("model_path", ""),
    }
    if info.get("note"):
        row["target_note"] = info["note"]
    return row


def load_row(row: SpeedRow, users: int, summary: dict, reading: Reading, raw_prefix: Path, out: Path) -> SpeedRow:
    tokens = summary["output_tokens"]
    row.update(reading_fields(reading))
    row.update(
        {
            "users": users,
            "speed_tokens_per_s": summary["output_tokens_per_s"],
            "requests_per_s": summary["requests_per_s"],
            "per_user_tokens_per_s": summary["per_user_tokens_per_s"],
            **{
                key: summary[key]
                for key in (
                    *LATENCY_FIELDS,
                    "requests_ok",
                    "requests_cut",
                    "duration_s",
                    "failures_by_status",
                )
            },
            "errors": summary["requests_failed"],
            "client_tokens": tokens,
            "server_tokens": reading.server_tokens,
            "j_per_token": reading.energy_j / tokens if reading.energy_j is not None and tokens else None,
            "raw": str(raw_prefix.relative_to(out)),
        }
    )
    row["notes"] = row_notes(row)
    return row


def row_notes(row: SpeedRow) -> str:
    """A loaded row's Notes, from its fields: over several rounds the counts are the rounds' sums."""
    rounds = row.get("rounds") or 1
    over = f" over {rounds} rounds" if rounds > 1 else ""
    notes = [row["target_note"]] if row.get("target_note") else []
    if row.get("attention"):
        notes.append(row["attention"])
    if row.get("dtype"):
        notes.append(row["dtype"])
    if row.get("requests_cut"):
        notes.append(f"{row['requests_cut']} cut at the end{over}")
    if row.get("failures_by_status"):
        notes.append(f"failures {row['failures_by_status']}")
    server, client = row.get("server_tokens"), row.get("client_tokens")
    if server is not None and server != client:
        notes.append(f"server counted {server:.0f} tokens, client {client}{over}")
    return "; ".join(notes)


def why_failed(exc: BaseException) -> str:
    reason = str(exc).strip().splitlines()
    detail = reason[0] if reason else type(exc).__name__
    return next((line.strip() for line in reversed(reason) if ERROR_LINE.search(line)), detail)


class Comparison:
    """One run: its groups of servers, each up together, their steps interleaved round by round.

    Every load step of every round is kept (``rounds``, ``clock_rounds``: in the order they ran,
    numbered by ``seq``); the report's rows are built from them at the end."""

    def __init__(
        self, config: CompareConfig, targets: list, out: Path, roofline: RooflineColumn, eos_ignored: bool
    ) -> None:
        self.config, self.targets, self.out, self.raw = config, targets, out, out / "raw"
        self.roofline = roofline
        self.load = dict(
            max_new_tokens=config.max_new_tokens,
            ignore_eos=eos_ignored,
            prompts_file=config.prompts_file,
            chat_template=config.chat_template,
            stop_timeout_s=config.stop_timeout,
            processes=config.processes,
        )
        self.pairs = clock_pairs(targets, run_versus(config)) if config.second_client != "none" else []
        self.clock_labels = {label for pair in self.pairs for label in pair}
        self.guidellm = second_clock.executable() if self.pairs else None
        self.prompts = load_prompts(config.prompts_file)
        self.eos_ignored = eos_ignored
        self.progress = Progress(run_plan(targets, config, self.clock_labels))
        self.rounds: list[SpeedRow] = []
        self.clock_rounds: list[ClockRow] = []
        self.idle: dict[str, SpeedRow] = {}
        self.failed: dict[str, SpeedRow] = {}
        self.infos: dict[str, dict] = {}
        self.failures: list[str] = []
        self.seq = itertools.count(1)

    # ---- one group ---------------------------------------------------------------------

    def run_group(self, group: Group) -> None:
        up: list = []
        try:
            for target in group.targets:
                if self.start(target):
                    up.append(target)
            # The utilisation gauge covers the last sample period: let the warm-ups leave it first.
            time.sleep(2 * self.config.sample_period + 0.5)
            for target in list(up):
                self.guarded(up, self.idle_row, target)
            for users in self.config.users:
                for number in range(1, self.config.repeat + 1):
                    for target in list(up):
                        self.guarded(up, self.load_step, target, users, number)
                    for target in [t for t in up if t.label in self.clock_labels]:
                        self.clock_step(target, users, number)
        finally:
            for target in reversed(group.targets):
                try:
                    target.stop()
                except Exception as exc:  # a server that will not stop must not keep the others up
                    print(f"  {target.label} did not stop cleanly: {exc}", file=sys.stderr, flush=True)

    def start(self, target) -> bool:
        self.progress.step(target.label, "starting the server")
        try:
            self.infos[target.label] = target.start(self.config.start_timeout)
            target.warm_up()
            self.progress.done(target.label)
            return True
        except Exception as exc:  # one server's failure must not cost the others their rows
            self.fail(target, exc, "did not run")
            return False

    def guarded(self, up: list, step, target, *args) -> None:
        """``step(target, *args)``; a target that fails there leaves ``up`` and is stopped."""
        try:
            step(target, *args)
        except Exception as exc:
            self.fail(target, exc, "stopped part-way")
            up.remove(target)
            target.stop()

    def fail(self, target, exc: BaseException, what: str) -> None:
        why = why_failed(exc)
        self.failures.append(f"{target.label}: {why}")
        info = self.infos.get(target.label, {})
        self.failed[target.label] = {
            **base_row(self.config.model, target, info),
            "users": 0,
            "failed": True,
            "notes": f"{what}: {why}",
        }
        (self.raw / f"{target.label}_failure.txt").write_text(f"{exc}\n\n{target.startup_output()}")
        self.progress.skip(target.label)
        print(f"  {target.label} failed: {why}", file=sys.stderr, flush=True)

    # ---- the steps ---------------------------------------------------------------------

    def idle_row(self, target) -> None:
        with target.watch(self.raw / f"{target.label}_idle") as watch:
            time.sleep(self.config.idle_seconds)
        row = base_row(self.config.model, target, self.infos[target.label])
        notes = [row.pop("target_note")] if row.get("target_note") else []
        self.idle[target.label] = {
            **row,
            "users": 0,
            **reading_fields(watch.reading),
            "notes": "; ".join(["idle (空载): loaded, no requests", *notes]),
            "raw": f"raw/{target.label}_idle",
        }
        self.progress.done(target.label)

    def prefix(self, target, users: int, number: int) -> Path:
        suffix = f"_r{number}" if self.config.repeat > 1 else ""
        return self.raw / f"{target.label}_u{users}{suffix}"

    def load_step(self, target, users: int, number: int) -> None:
        self.progress.step(target.label, f"{users} users for {self.config.duration:g} s{self.round_text(number)}")
        prefix = self.prefix(target, users, number)
        with target.watch(prefix) as watch:
            spec = LoadSpec(users, self.config.duration, **self.load)
            summary = run_locust(target.locustfile, target.host, spec, prefix, target.locust_args())
        row = load_row(
            base_row(self.config.model, target, self.infos[target.label]),
            users,
            summary,
            watch.reading,
            prefix,
            self.out,
        )
        self.roofline.fill(row)
        row.update({"round": number, "seq": next(self.seq), "clock": "locust"})
        self.rounds.append(row)
        self.progress.done(target.label)

    def round_text(self, number: int) -> str:
        return f", round {number}/{self.config.repeat}" if self.config.repeat > 1 else ""

    def clock_step(self, target, users: int, number: int) -> None:
        """guidellm against the target's OpenAI-compatible URL; a failure is reported, the target runs on."""
        what = f"guidellm, {users} streams for {self.config.duration:g} s{self.round_text(number)}"
        self.progress.step(target.label, what)
        prefix = Path(f"{self.prefix(target, users, number)}_clock")
        try:
            if self.guidellm is None:
                raise RuntimeError("guidellm is not installed: python -m loadtest.compare.second_clock install")
            load = second_clock.ClockLoad(
                users=users,
                duration_s=self.config.duration,
                max_new_tokens=self.config.max_new_tokens,
                ignore_eos=self.eos_ignored,
                prompts=self.prompts,
                chat_template=self.config.chat_template,
            )
            served = target.served_name if isinstance(target, OutsideServerTarget) else target.model
            url = target.openai_url
            if not url:
                raise RuntimeError("no OpenAI-compatible URL (our server runs without --http-port)")
            summary = second_clock.run(url, served, self.config.model_path, load, prefix, self.guidellm)
            notes = ["the prompts file ran out before the step's end"] if summary.pop("data_ran_out") else []
            if summary["requests_failed"]:
                notes.append(f"{summary['requests_failed']} failed")
            self.clock_rounds.append(
                {
                    "engine": target.label,
                    "users": users,
                    "round": number,
                    "seq": next(self.seq),
                    "clock": "guidellm",
                    **summary,
                    "notes": "; ".join(notes),
                    "raw": str(prefix.relative_to(self.out)),
                }
            )
        except Exception as exc:
            why = why_failed(exc)
            self.failures.append(f"{target.label} (guidellm, {users} users{self.round_text(number)}): {why}")
            print(f"  guidellm against {target.label} failed: {why}", file=sys.stderr, flush=True)
        self.progress.done(target.label)

    # ---- the report's rows -------------------------------------------------------------

    def rows(self) -> list[SpeedRow]:
        """Per target, in the order given: the idle row, one row per concurrency (the rounds'
        medians), and a failure row where it failed."""
        loaded = aggregate_all(self.rounds)
        for row in loaded.values():
            row["notes"] = row_notes(row)
        rows = []
        for target in self.targets:
            if target.label in self.idle:
                rows.append(self.idle[target.label])
            rows += [loaded[(target.label, u)] for u in self.config.users if (target.label, u) in loaded]
            if target.label in self.failed:
                rows.append(self.failed[target.label])
        return rows


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    started = dt.datetime.now()
    out = Path(config.out) if config.out else default_out("speed")
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    from engines.models import resolve_model

    model_path = str(resolve_model(config.model))
    config = dataclasses.replace(config, model_path=model_path)

    targets = make_targets(config, raw)
    roofline = RooflineColumn(model_path, context=16 + config.max_new_tokens // 2)
    eos_ignored = ignores_eos(config, targets)
    run = Comparison(config, targets, out, roofline, eos_ignored)
    if run.pairs and run.guidellm is None:
        print("guidellm is not installed: python -m loadtest.compare.second_clock install", file=sys.stderr)
        return 2
    estimate = target_estimate(roofline.shape.params, config.kv_cache_gb)
    versus = run_versus(config)
    groups, together = plan_groups(targets, versus, config.together, memory_budget(), estimate)
    print(f"  {together}: " + " | ".join(", ".join(g.labels) for g in groups), file=sys.stderr, flush=True)
    if config.probe_seconds > 0:
        run.progress.step("roofline", "probing this machine's bandwidth and FLOP/s")
        # A variant may run its engine in another dtype (--dtype in its flags): that one is probed too.
        ours = {target_dtype(t) for t in targets if isinstance(t, YayiTarget)}
        roofline.probe({config.vllm_dtype, config.dtype, "float32", *ours} - {"auto"}, config.probe_seconds)

    for group in groups:
        run.run_group(group)
    rows = run.rows()

    context = {
        "model": config.model,
        "model_path": model_path,
        "command": "yayi-compare " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": describe(machine_info()),
        "users": config.users,
        "duration_s": config.duration,
        "max_new_tokens": config.max_new_tokens,
        "repeat": config.repeat,
        "together": together,
        "groups": [g.labels for g in groups],
        "second_client": config.second_client if run.pairs else "none",
        "clock_pairs": run.pairs,
        "variants": {v.label: v.describe() for v in config.variant},
        "versus": versus + http_twins(versus, targets),
        "failures": run.failures,
        "roofline": roofline.describe(),
        "column_notes": column_notes(config, eos_ignored),
    }
    paths = write_report(out, rows, context, run.rounds, run.clock_rounds)
    versus = api_comparison(rows)
    if versus:
        text = (
            "# gRPC against the HTTP front end\n\nThe same engine, load and prompts; "
            "HTTP's figures over gRPC's (1.00: the same).\n\n" + markdown_table(versus) + "\n"
        )
        (out / "api_comparison.md").write_text(text)
        print(text, flush=True)
    print(printed_summary((out / "speed.md").read_text()), flush=True)
    print(f"report: {paths[0]}", flush=True)
    return 0 if not run.failures else 1


def printed_summary(markdown: str) -> str:
    """speed.md as the run ends it on the terminal: the tables and cautions, not the column notes or plots."""
    sections = markdown.split("\n## ")
    kept = [sections[0]] + [
        section
        for section in sections[1:]
        if not section.startswith(("What the columns hold", "Plots", "Roofline bound"))
    ]
    return "\n## ".join(kept)


def api_comparison(rows: list[SpeedRow]) -> list[dict]:
    """For each engine measured through both front ends: HTTP's tokens/s and TTFT p50 over gRPC's, per step."""
    loaded = {(r["engine"], r["users"]): r for r in rows if r.get("users") and r.get("speed_tokens_per_s")}
    out = []
    for (engine, users), http in loaded.items():
        grpc = loaded.get((engine.removesuffix(HTTP_SUFFIX), users)) if engine.endswith(HTTP_SUFFIX) else None
        if grpc is None:
            continue
        out.append(
            {
                "Engine": grpc["engine"],
                "Users": users,
                "tokens/s gRPC": grpc["speed_tokens_per_s"],
                "tokens/s HTTP": http["speed_tokens_per_s"],
                "tokens/s HTTP/gRPC": http["speed_tokens_per_s"] / grpc["speed_tokens_per_s"],
                "TTFT p50 gRPC (ms)": grpc["ttft_p50_ms"],
                "TTFT p50 HTTP (ms)": http["ttft_p50_ms"],
                "ITL p50 gRPC (ms)": grpc["itl_p50_ms"],
                "ITL p50 HTTP (ms)": http["itl_p50_ms"],
            }
        )
    return out


def column_notes(config: CompareConfig, eos_ignored: bool) -> list[str]:
    length = (
        f"exactly {config.max_new_tokens} new tokens (ignore_eos)"
        if eos_ignored
        else f"up to {config.max_new_tokens} new tokens, ending at EOS (transformers serve cannot ignore it)"
    )
    variants = [
        f"{v.label}: our {v.engine} engine started as the {v.engine} rows are, plus `{shlex.join(v.args)}` "
        f"(`--variant`); where both run, a ratio table sets it over {v.engine}."
        for v in config.variant
    ]
    return [
        f"Load: each user sends the prompts in turn, greedy, {length}, "
        f"no pause between requests, for {config.duration:g} s per step; Users is the concurrency.",
        "Speed: output tokens over the step (first request sent to last token received), all users together; "
        "tokens of requests cut by the end of the step count, their latencies do not."
        + (
            f" Over the {config.repeat} rounds: the median, with the rounds' min–max in brackets; every other "
            "figure of a loaded row is the median of its rounds too (Mem: the peak; Errors: the sum)."
            if config.repeat > 1
            else ""
        ),
        "Mem: peak of the server's memory during the step: on CPU the resident memory of the server process "
        "and its children (vLLM's engine runs in children), on CUDA the GPU memory NVML reports.",
        "GPU-UTL: on CPU the server's CPU time as a share of all cores of the machine (`CPU n%`), mean over the step.",
        "Pwr_usg: mean NVML power on CUDA, RAPL package power on CPU where readable, else n/a; J/token from the "
        "energy counter over the step.",
        "TTFT, ITL and E2E percentiles are measured by the Locust client per request (raw/*_tokens.csv).",
        "% of bound: Speed over the decode roofline bound for this model on this device at batch = Users "
        "(engines that do not batch are still measured against the batched bound), for the weights the row's "
        "server really runs: its dtype's width, or for a GGUF (llama-cpp, llama-server) the file's own tensor "
        "bytes, so a Q4_1 row is held to its smaller weights' higher bound.",
        "vllm-openai: vLLM's own OpenAI-compatible server, same prompts and load through streaming /v1/completions.",
        "transformers-serve-matched: `transformers serve MODEL_DIR --continuous-batching` with hf-cb's KV cache "
        "(blocks, block size, tokens per step), same prompts and load through streaming /v1/completions; it sends "
        "usage only at the end, so each text chunk counts as a token as it arrives and the final usage adds the rest.",
        "transformers-serve-defaults: the same server as a user starts it, `transformers serve MODEL_DIR "
        "--continuous-batching` in the run's dtype and nothing else: its cache is its own default (on a CPU 90 % of "
        "the machine's memory, capped to what is free where that is less; its Notes say so).",
        "llama-server: llama.cpp's own OpenAI-compatible server, started as our llama-cpp engine starts its "
        "child (the same GGUF, --parallel, --threads, context per slot and batch size) on a TCP port with "
        "--metrics, same prompts and load through streaming /v1/completions; it sends usage only at the end, so "
        "text chunks count as tokens as they arrive and the final usage adds the rest; its own "
        "llamacpp:tokens_predicted_total, read once its slots are idle, is the server's count.",
        "ENGINE-http (hf-kv-http, vllm-http): the engine through our OpenAI-compatible front end (--http-port), "
        "with the same streaming /v1/completions load and client as vllm-openai; a bare engine name is gRPC.",
        *variants,
    ]


if __name__ == "__main__":
    sys.exit(main())
