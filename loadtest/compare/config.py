"""Everything ``yayi-compare``'s command line sets, in one frozen object: each field is its flag.

Declared once with ``flag_option()`` (engines/option_flags.py, the mechanism the server's config
uses): its default, its ``--help`` text and how its text is read.  ``parse_args`` builds it once
from argv; what the run learns later (the model's folder) is set with ``dataclasses.replace``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from engines.option_flags import build_parser as parser_for
from engines.option_flags import flag_option, parse_config
from loadtest.compare.targets import parse_baselines
from loadtest.compare.variants import Variant, by_label, check_flags, check_names, parse_variant


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip().lower()
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (examples: 60s, 2m, 45)") from None


def parse_users(text: str) -> tuple[int, ...]:
    try:
        users = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--users takes numbers separated by commas, got {text!r}") from None
    if not users or min(users) < 1:
        raise argparse.ArgumentTypeError("--users needs at least one concurrency, each 1 or more")
    return users


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number, 1 or more, got {text!r}")
    return value


def parse_apis(text: str) -> tuple[str, ...]:
    apis = tuple(part.strip() for part in text.split(",") if part.strip())
    if not apis or set(apis) - {"grpc", "http"}:
        raise argparse.ArgumentTypeError(f"--apis takes grpc, http or both separated by a comma, got {text!r}")
    return apis


@dataclass(frozen=True)
class CompareConfig:
    engines: str = flag_option(
        "hf-eager,hf-kv,hf-flash,vllm",
        "comma-separated engines and --variant labels; empty with --baseline vllm-openai loads only vLLM's own server",
    )
    variant: tuple[Variant, ...] = flag_option(
        (),
        "one string, repeatable: LABEL, which --engines may then name, is ENGINE started as the run starts "
        "it plus these yayi-serve flags, its rows labelled LABEL and set beside ENGINE's, e.g. "
        "'vllm-pp2=vllm --pipeline-parallel-size 2'",
        parse=parse_variant,
        repeat=True,
        metavar="LABEL=ENGINE [FLAGS...]",
    )
    model: str = flag_option("smollm2-135m", "built-in model name or local folder")
    apis: tuple[str, ...] = flag_option(
        ("grpc",),
        "front ends each engine is measured through: grpc, http (the OpenAI-compatible one) or grpc,http",
        parse=parse_apis,
    )
    users: tuple[int, ...] = flag_option((1, 4, 16), "concurrencies, e.g. 1,4,16", parse=parse_users)
    duration: float = flag_option(60.0, "load per step, e.g. 60s", parse=parse_duration)
    max_new_tokens: int = flag_option(128, "tokens each request asks for", minimum=1)
    prompts_file: str = flag_option("", "one prompt per line (default: the log's speed prompts)")
    chat_template: bool = flag_option(False, "wrap prompts in the model's chat template")
    dtype: str = flag_option("auto", "hf engines' dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    vllm_dtype: str = flag_option("bfloat16", "dtype of the vllm engine and of vLLM's own server")
    kv_cache_gb: float = flag_option(1.0, "vLLM's CPU KV cache (both vLLM servers)", positive=True)
    max_model_len: int | None = flag_option(
        None, "context both vLLM servers serve (default: the model's, at most 2048, as our engine)", minimum=1
    )
    baseline: tuple[str, ...] | str = flag_option(
        "auto",
        "outside servers loaded too: vllm-openai, vllm-openai-matched, transformers-serve-matched, "
        "transformers-serve-defaults, llama-server, llama-server-defaults (comma-separated), none, or auto: both "
        "vLLM servers when vllm is among the engines and installed, both transformers serves when hf-cb is, both "
        "llama-servers when llama-cpp is and llama.cpp is built",
        parse=parse_baselines,
    )
    ignore_eos: str = flag_option(
        "auto",
        "true: every request makes exactly --max-new-tokens; false: requests end at EOS; auto: true "
        "unless transformers-serve is loaded, which cannot ignore EOS (then false for every target)",
        choices=("auto", "true", "false"),
    )
    server_args: str = flag_option("", "extra yayi-serve arguments for every engine, one string")
    trust_remote_code: bool = flag_option(
        False, "the model folder's own code runs: passed to every yayi-serve this run starts"
    )
    baseline_args: str = flag_option("", "extra arguments for vLLM's own server, one string")
    transformers_serve_args: str = flag_option(
        "", "extra arguments for transformers serve with hf-cb's cache (transformers-serve-matched), one string"
    )
    transformers_serve_defaults_args: str = flag_option(
        "",
        "extra arguments for transformers serve left to its defaults (transformers-serve-defaults), one string",
    )
    llama_server_args: str = flag_option(
        "",
        "extra arguments for llama.cpp's own llama-server (it takes llama-cpp's threads, slots and context "
        "from --server-args), one string",
    )
    repeat: int = flag_option(
        1,
        "rounds of every step, the targets of a group interleaved (A B C, A B C, ...); tables show "
        "medians with their min-max, ratios the median of per-round ratios",
        parse=positive_int,
    )
    together: str = flag_option(
        "auto",
        "which servers are up at once: all; pairs (each engine with the peers it is compared with, one "
        "group after another); auto: all when the estimated memory fits what is free, else pairs packed",
        choices=("auto", "all", "pairs"),
    )
    second_client: str = flag_option(
        "none",
        "guidellm: an outside client also drives each step against our HTTP front end and each outside "
        "peer (python -m loadtest.compare.second_clock install), its ratio printed beside Locust's",
        choices=("none", "guidellm"),
    )
    idle_seconds: float = flag_option(5.0, "how long the idle row is watched", minimum=0)
    sample_period: float = flag_option(1.0, "seconds between device readings", positive=True)
    stop_timeout: float = flag_option(
        0.0, "seconds requests in flight at the end of a step may finish (0: cut them)", minimum=0
    )
    processes: int = flag_option(1, "Locust processes (for loads one process cannot drive)", minimum=1)
    start_timeout: float = flag_option(900.0, "seconds a server may take to load", positive=True)
    probe_seconds: float = flag_option(
        3.0, "length of the CPU roofline probe per dtype; 0 skips it (no %% of bound on CPU)", minimum=0
    )
    out: str = flag_option("", "report folder (default reports/speed-<UTC time>)")
    # Not a flag: the model's folder, resolved once the run starts (dataclasses.replace).
    model_path: str = ""

    @property
    def engine_names(self) -> list[str]:
        """--engines as a list."""
        return [name.strip() for name in self.engines.split(",") if name.strip()]


def parse_args(argv: list[str] | None = None, description: str = "") -> CompareConfig:
    """The command line, with what no single option can check refused in one line: every name in
    --engines an engine or a defined variant, no variant defined twice, each variant's flags ones
    its engine takes."""
    config = parse_config(CompareConfig, argv, prog="yayi-compare", description=description)
    try:
        variants = by_label(config.variant)
        check_names(config.engine_names, variants)
        for variant in variants.values():
            check_flags(variant, config.model)
    except ValueError as exc:
        build_parser(description).error(str(exc))
    return config


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """yayi-compare's parser, made from CompareConfig's fields."""
    return parser_for(CompareConfig, prog="yayi-compare", description=description)
