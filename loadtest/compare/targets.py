"""The servers the comparison driver measures, each behind the same small interface.

A target starts, warms up, is watched while the load runs (device memory, utilisation,
power, energy and the server's own token count) and stops.  ``YayiTarget`` is our server
with one engine, loaded through one front end (``api``: gRPC, or the OpenAI-compatible HTTP
one), and reads its /metrics; an ``OutsideServerTarget`` is a peer's OpenAI-compatible server
(vLLM's own, ``transformers serve``, llama.cpp's ``llama-server``), whose process tree is read
the way our CPU probe reads ours.  Every target says which
locustfile drives it and with which extra options, and ``openai_url`` is where an OpenAI
client (vLLM's benchmark client) reaches it: the ``Target`` protocol.  They are set up from
one ``TargetConfig``, never from the driver's command line.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from loadtest.launch.server_process import ROOT, ServerProcess
from loadtest.measure import scrape
from server.device_sampler import CpuProbe


@dataclass(frozen=True)
class TargetConfig:
    """What the targets are set up from: the model, and the settings the peers must share with ours."""

    model: str
    model_path: str
    dtype: str  # the hf engines' and transformers serve's
    vllm_dtype: str  # our vllm engine's and vLLM's own server's
    kv_cache_gb: float
    max_model_len: int | None  # None: the model's own, at most the fallback both vLLM servers use
    sample_period: float
    baseline_args: tuple[str, ...] = ()  # extra arguments for vLLM's own server
    transformers_serve_args: tuple[str, ...] = ()  # for the one with hf-cb's cache
    transformers_serve_defaults_args: tuple[str, ...] = ()  # for the one left to its own defaults
    server_args: tuple[str, ...] = ()  # every engine's extra yayi-serve flags: llama-server reads llama-cpp's here
    llama_server_args: tuple[str, ...] = ()  # extra arguments for llama.cpp's own server


class Target(Protocol):
    """What the comparison driver asks of every server it measures."""

    label: str
    locustfile: Path

    @property
    def host(self) -> str: ...

    @property
    def openai_url(self) -> str: ...

    def locust_args(self) -> list[str]: ...

    def start(self, timeout: float) -> dict: ...

    def warm_up(self) -> None: ...

    def metrics_text(self) -> str: ...

    def watch(self, raw_prefix: Path) -> _Watch: ...

    def stop(self) -> None: ...

    def startup_output(self) -> str: ...


@dataclass
class Reading:
    """Device figures over one stretch of time (idle, or one load step)."""

    memory_peak_bytes: float | None = None
    utilization_mean: float | None = None
    power_mean_w: float | None = None
    energy_j: float | None = None
    server_tokens: float | None = None
    device: str = "cpu"


# The label suffix of an engine's rows through the HTTP front end ("vllm-http"); a bare label is gRPC.
HTTP_SUFFIX = "-http"


class YayiTarget:
    locustfile = ROOT / "loadtest" / "speed.py"

    def __init__(
        self,
        engine: str,
        model: str,
        server_args: list[str],
        queue: int,
        sample_period: float,
        api: str = "grpc",
        shares_with: YayiTarget | None = None,
        name: str = "",
        note: str = "",
    ) -> None:
        """``shares_with``: the target just before this one, of the same engine through the other front
        end; its server is handed over rather than stopped and started again, so both front ends are
        measured on one process, back to back (and a vllm start, minutes on a CPU, is paid once).
        ``name``: the rows' label when it is not the engine's (a variant, loadtest/compare/variants.py), and
        ``note`` what its rows' Notes say of it."""
        name = name or engine
        # Rows of the HTTP front end are labelled apart, so one report holds both front ends.
        self.label = name if api == "grpc" else f"{name}{HTTP_SUFFIX}"
        self.engine, self.model, self.api, self.note = engine, model, api, note
        sharing = shares_with is not None or api == "http"
        self.server_args = server_args + (["--http-port", "0"] if sharing else [])
        self.queue = queue
        self.sample_period = sample_period
        self.server: ServerProcess | None = None
        self.info: dict = {}
        self.shares_with = shares_with
        self.hands_over = False  # set on the target whose server the next one takes
        if shares_with is not None:
            shares_with.hands_over = True
            shares_with.server_args = self.server_args

    @property
    def host(self) -> str:
        return self.server.http_url if self.api == "http" else self.server.address

    @property
    def openai_url(self) -> str:
        return self.server.http_url

    def locust_args(self) -> list[str]:
        return ["--api", "http", "--served-model", self.model] if self.api == "http" else []

    def start(self, timeout: float) -> dict:
        handed = self.shares_with.server if self.shares_with is not None else None
        if handed is not None and handed.process.poll() is None:
            self.server, self.info = handed, self.shares_with.info
            return self.info
        self.server = ServerProcess(
            "--engine",
            self.engine,
            "--model",
            self.model,
            "--max-queue",
            str(self.queue),
            "--device-sample-period",
            str(self.sample_period),
            # What it loaded (llama-cpp's GGUF file) goes in the row: the roofline reads its bytes.
            "--expose-model-path",
            *self.server_args,
            ready_timeout=timeout,
        ).wait_ready(timeout)
        from server.grpc.wire import pb

        info = self.server.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
        self.info = {
            "engine": info.engine,
            "dtype": info.dtype,
            "device": info.device,
            "attention": info.attention,
            "use_cache": info.use_cache,
            "model_path": info.model_path,
        }
        if self.note:
            self.info["note"] = self.note
        return self.info

    def warm_up(self) -> None:
        for _ in self.server.stream("Warm up.", max_new_tokens=8, ignore_eos=True, timeout=300):
            pass

    def metrics_text(self) -> str:
        return scrape.fetch(scrape.metrics_url(self.server.metrics_port))

    def watch(self, raw_prefix: Path) -> MetricsWatch:
        return MetricsWatch(self, raw_prefix)

    def stop(self) -> None:
        if self.server is not None and not self.hands_over:
            self.server.stop()

    def startup_output(self) -> str:
        return "\n".join(self.server.lines[-20:]) if self.server else ""


class _Watch:
    """One stretch of a run: the target's counters read before and after, its gauges sampled between.

    The before/after reading and the raw files are here, once; each kind of target says how its
    device is sampled (``_start``, ``_stop``) and what the reading is (``_fill``).
    """

    def __init__(self, target, raw_prefix: Path, device: str) -> None:
        self.target, self.raw_prefix = target, raw_prefix
        self.reading = Reading(device=device)

    def __enter__(self):
        self.before = scrape.parse(self._keep("before"))
        self._start()
        return self

    def __exit__(self, *_) -> None:
        self._stop()
        self._fill(scrape.parse(self._keep("after")))

    def _keep(self, when: str) -> str:
        body = self.target.metrics_text()
        if body:
            Path(f"{self.raw_prefix}_metrics_{when}.txt").write_text(body)
        return body

    def _start(self) -> None: ...

    def _stop(self) -> None: ...

    def _fill(self, after: scrape.Samples) -> None: ...


class MetricsWatch(_Watch):
    """Our server: its device gauges sampled from /metrics, its counters' deltas."""

    GAUGES = ("yayi_device_memory_used_bytes", "yayi_device_utilization_ratio", "yayi_device_power_watts")

    def __init__(self, target: YayiTarget, raw_prefix: Path) -> None:
        super().__init__(target, raw_prefix, target.info.get("device", "cpu"))

    def _start(self) -> None:
        # Scraping no faster than the server samples its device: more often would only repeat values.
        self.sampler = scrape.GaugeSampler(
            scrape.metrics_url(self.target.server.metrics_port), self.GAUGES, period=max(0.5, self.target.sample_period)
        )
        self.sampler.__enter__()

    def _stop(self) -> None:
        self.sampler.__exit__()

    def _fill(self, after: scrape.Samples) -> None:
        self.reading.memory_peak_bytes = self.sampler.max("yayi_device_memory_used_bytes")
        self.reading.utilization_mean = self.sampler.mean("yayi_device_utilization_ratio")
        self.reading.power_mean_w = self.sampler.mean("yayi_device_power_watts")
        self.reading.energy_j = _delta(self.before, after, "yayi_energy_joules_total")
        self.reading.server_tokens = _delta(self.before, after, "yayi_generation_tokens_total")


def _delta(before: scrape.Samples, after: scrape.Samples, name: str) -> float | None:
    start, end = scrape.total(before, name), scrape.total(after, name)
    # A labelled counter appears at its first increment: absent before means zero then.
    return None if end is None else end - (start or 0.0)


class OutsideServerTarget:
    """An outside OpenAI-compatible server for the baseline rows: started on a free port as its own
    process group (so its children go with it), watched by our CPU probe, loaded through streaming
    ``/v1/completions``.  A subclass says how to start it and what it counts."""

    locustfile = ROOT / "loadtest" / "speed.py"
    label = ""
    name = ""  # how the log's Engine column names it
    attention = ""
    tokens_counter: str | None = None  # its own Prometheus counter of generated tokens, if it has one

    def __init__(self, model_path: str, served_name: str, dtype: str, log_path: Path, sample_period: float) -> None:
        self.model_path, self.served_name, self.dtype = model_path, served_name, dtype
        self.log_path, self.sample_period = log_path, sample_period
        self.process: subprocess.Popen | None = None
        self.port = _free_port()
        self.info: dict = {}

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        return self.host

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    fresh_connection = False  # llama-server closes a streamed connection after answering

    def locust_args(self) -> list[str]:
        args = ["--api", "http", "--served-model", self.served_name]
        return [*args, "--fresh-connection", "true"] if self.fresh_connection else args

    def start(self, timeout: float) -> dict:
        command = self.command()
        self._log = open(self.log_path, "w")
        # The exact command first, so the raw folder says how the peer was run.
        self._log.write(f"$ {shlex.join(command)}\n")
        self._log.flush()
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env(),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} exited ({self.process.returncode}):\n{self.startup_output()}")
            try:
                with urllib.request.urlopen(f"{self.host}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
        else:
            raise TimeoutError(f"{self.label} not healthy after {timeout:.0f} s:\n{self.startup_output()}")
        self.info = {
            "engine": self.name,
            "dtype": self.dtype,
            "device": "cpu",
            "attention": self.attention,
            "use_cache": True,
            "model_path": self.model_path,
        }
        return self.info

    def warm_up(self) -> None:
        import json

        body = json.dumps({"model": self.served_name, "prompt": "Warm up.", "max_tokens": 8}).encode()
        request = urllib.request.Request(
            f"{self.host}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            urllib.request.urlopen(request, timeout=300).read()
        except urllib.error.HTTPError as error:
            # Its own words (transformers serve says why its worker died), not just the status line.
            detail = error.read().decode(errors="replace")[:500]
            raise RuntimeError(f"{self.label} refused its warm-up: {error.code} {detail}") from None

    def metrics_text(self) -> str:
        return scrape.fetch(f"{self.host}/metrics") if self.tokens_counter else ""

    def settle(self) -> None:
        """Called when a step's load has ended, before its counters are read: by default nothing."""

    def watch(self, raw_prefix: Path) -> ProcessWatch:
        return ProcessWatch(self, raw_prefix)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process is not None:
            self._log.close()

    def startup_output(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""


class VLLMServerTarget(OutsideServerTarget):
    """vLLM's own server (``python -m vllm.entrypoints.openai.api_server``), beside our vllm rows."""

    label = "vllm-openai"
    name = "vllm (OpenAI server)"
    attention = "vLLM's own"
    tokens_counter = "vllm:generation_tokens_total"

    def __init__(self, *args, kv_cache_gb: float, max_model_len: int, extra_args: list[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kv_cache_gb, self.max_model_len, self.extra_args = kv_cache_gb, max_model_len, extra_args

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_path,
            "--served-model-name",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--seed",
            "0",
            *self.extra_args,
        ]

    def env(self) -> dict[str, str]:
        return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": f"{self.kv_cache_gb:g}"}


class TransformersServeTarget(OutsideServerTarget):
    """``transformers serve MODEL_DIR --continuous-batching``, beside our hf-cb rows, with hf-cb's KV
    cache (blocks, block size, tokens per step): left to itself on a CPU it sizes its cache from
    90 % of the machine's memory (``TransformersServeDefaultsTarget``).  It serves the model under
    its path and counts no tokens in Prometheus; its /v1/completions knows no ignore_eos, so its
    load honours EOS."""

    label = "transformers-serve-matched"
    name = "transformers serve --continuous-batching, hf-cb's KV cache"
    attention = "paged (transformers' default)"

    def __init__(self, model_path: str, dtype: str, log_path: Path, sample_period: float, extra_args: list[str]):
        import torch

        from engines.hf.model import resolve_dtype
        from engines.model_facts import dtype_name

        # Our "auto" (float32 on a CPU) named as transformers takes it; its own "auto" is the checkpoint's.
        dtype = dtype_name(resolve_dtype(dtype, torch.device("cpu")))
        super().__init__(model_path, model_path, dtype, log_path, sample_period)
        self.extra_args = extra_args

    def command(self) -> list[str]:
        from engines.hf_cb.engine import default_cache_plan

        plan = default_cache_plan(self.model_path, self.dtype)
        return [
            *self.serve_command(),
            "--cb-num-blocks",
            str(plan.num_blocks),
            "--cb-block-size",
            str(plan.block_size),
            "--cb-max-batch-tokens",
            str(plan.max_batch_tokens),
            *self.extra_args,
        ]

    def serve_command(self) -> list[str]:
        """``transformers serve`` with continuous batching on our port, in the run's dtype: no cache options."""
        return [
            str(Path(sys.executable).parent / "transformers"),
            "serve",
            self.model_path,
            "--continuous-batching",
            "--dtype",
            self.dtype,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]

    def env(self) -> dict[str, str]:
        return {**os.environ, "HF_HUB_OFFLINE": "1"}


@dataclass(frozen=True)
class LlamaSetup:
    """What our llama-cpp engine hands its llama-server child, read from the same flags."""

    threads: int
    parallel: int
    context: int | None  # None: the GGUF's own, at most DEFAULT_CONTEXT, as the engine takes it
    batch_size: int
    repack: bool
    binary: str  # "" for the one `make llama-cpp` builds


def llama_setup(model: str, server_args: tuple[str, ...] | list[str]) -> LlamaSetup:
    """The llama-cpp engine's settings from the flags the comparison starts it with, parsed by the
    server's own command line, so the baseline cannot be set up from different defaults."""
    import io

    from engines.llama_cpp.engine import LlamaCppOptions
    from server.cli import build_parser, engine_options_from_args

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = build_parser().parse_args(["--engine", "llama-cpp", "--model", model, *server_args])
            options = engine_options_from_args(args)
    except SystemExit as exc:
        why = (errors.getvalue().strip().splitlines() or [str(exc)])[-1]
        why = f"llama-server takes llama-cpp's settings from --server-args, which it refused: {why}"
        raise RuntimeError(why) from None
    assert isinstance(options, LlamaCppOptions)
    return LlamaSetup(
        threads=options.threads or os.cpu_count() or 1,
        parallel=args.max_concurrency or options.parallel,
        context=options.context,
        batch_size=options.batch_size,
        repack=bool(options.repack),
        binary=options.llama_server,
    )


class LlamaServerTarget(OutsideServerTarget):
    """llama.cpp's own ``llama-server``, beside our llama-cpp rows: the same GGUF (the shipped Q4_1
    or the one converted once for a dtype), the same threads, slots, context per slot, batch size
    and repacking as our engine's child, on a TCP port instead of a private socket.  It counts its
    generated tokens in Prometheus (``--metrics``); streamed /v1/completions carry usage only at the
    end, so the client counts text chunks as they arrive and the final usage adds the rest."""

    fresh_connection = True
    label = "llama-server"
    name = "llama.cpp's llama-server"
    attention = "llama.cpp (flash attention auto)"
    tokens_counter = "llamacpp:tokens_predicted_total"
    SETTLE_S = 10.0

    def __init__(self, config: TargetConfig, log_path: Path) -> None:
        super().__init__(config.model_path, config.model, config.dtype, log_path, config.sample_period)
        self.model, self.requested_dtype = config.model, config.dtype
        self.server_args, self.extra_args = list(config.server_args), list(config.llama_server_args)

    def command(self) -> list[str]:
        """Set up at start, not when the run is planned: a bad flag or a missing build is this row's
        failure, and the GGUF (converted once for a dtype) is made only when it is served."""
        from engines.llama_cpp.gguf import llama_server_binary, resolve_gguf
        from engines.model_facts import DEFAULT_CONTEXT
        from loadtest.measure.gguf_file import context_length

        self.setup = llama_setup(self.model, self.server_args)
        gguf = resolve_gguf(self.model, self.requested_dtype)
        # What really runs, for the row's dtype and its roofline: "Q4_1", "bfloat16", ...
        self.model_path, self.dtype = str(gguf.path), gguf.weights
        context = self.setup.context or min(DEFAULT_CONTEXT, context_length(gguf.path) or DEFAULT_CONTEXT)
        parallel = self.setup.parallel
        return [
            str(llama_server_binary(self.setup.binary)),
            "--model",
            self.model_path,
            "--alias",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--parallel",
            str(parallel),
            "--ctx-size",
            str(context * parallel),
            "--threads",
            str(self.setup.threads),
            "--batch-size",
            str(self.setup.batch_size),
            "--no-webui",
            "--no-kv-unified",
            "--seed",
            "0",
            *([] if self.setup.repack else ["--no-repack"]),
            "--metrics",
            *self.extra_args,
        ]

    def settle(self) -> None:
        """Wait, at most SETTLE_S, until no slot is busy.  llama-server adds a request's tokens to
        its counter when the slot is released, so a request the step's end cut is counted only once
        the server has seen the hang-up (at its next token) and freed the slot; read sooner, the
        counter would miss every token of the requests in flight."""
        deadline = time.monotonic() + self.SETTLE_S
        while time.monotonic() < deadline:
            if not scrape.total(scrape.parse(self.metrics_text()), "llamacpp:requests_processing"):
                return
            time.sleep(0.1)


# What transformers' continuous batching takes for its cache on a CPU when not told: this share of
# the machine's memory (less what the process holds), zeroed at start-up, so all of it resident.
TRANSFORMERS_DEFAULT_MEMORY_SHARE = 0.9
# Memory a comparison leaves to everything else on the machine when it has to cap that cache.
MEMORY_RESERVE_BYTES = 6 * 2**30
MEMORY_RESERVE_SHARE = 0.25


class TransformersServeDefaultsTarget(TransformersServeTarget):
    """``transformers serve MODEL_DIR --continuous-batching`` as a user starts it: the cache's blocks,
    block size and tokens per step are its own defaults (only the dtype is the run's, so the work is
    the same).  Its default cache on a CPU is 90 % of the machine's memory, zeroed at start: where
    that is more than is free, less a reserve for the rest of the machine, it is capped with
    ``--cb-max-memory-percent`` to what is free, and the row's note says so."""

    label = "transformers-serve-defaults"
    name = "transformers serve --continuous-batching, its own cache defaults"
    note = ""  # set by command() when the cache had to be capped

    def command(self) -> list[str]:
        self.note = ""
        cap: list[str] = []
        if not any(arg.startswith("--cb-max-memory-percent") for arg in self.extra_args):
            share = default_cache_share()
            if share is not None:
                cap = ["--cb-max-memory-percent", f"{share:.2f}"]
                self.note = (
                    f"cache capped at {share:.0%} of the machine's memory: its default, "
                    f"{TRANSFORMERS_DEFAULT_MEMORY_SHARE:.0%}, is more than is free"
                )
        return [*self.serve_command(), *cap, *self.extra_args]

    def start(self, timeout: float) -> dict:
        info = super().start(timeout)
        if self.note:
            info["note"] = self.note
        return info


def default_cache_share(available: int | None = None, total: int | None = None, held: int = 2**30) -> float | None:
    """None when transformers' default cache share fits in the memory free now, less the reserve
    (``held``: what its own process holds before the cache, which the default leaves out); else the
    share of the machine's memory that does fit.  Raises when not even 1 % does."""
    import psutil

    memory = psutil.virtual_memory()
    available = memory.available if available is None else available
    total = memory.total if total is None else total
    free = available - max(MEMORY_RESERVE_BYTES, MEMORY_RESERVE_SHARE * total) - held
    if TRANSFORMERS_DEFAULT_MEMORY_SHARE * (total - held) <= free:
        return None
    share = int(100 * free / total) / 100
    if share < 0.01:
        raise RuntimeError(
            f"transformers serve's default cache needs memory this machine does not have free: "
            f"{available / 2**30:.1f} GiB available"
        )
    return share


class ProcessWatch(_Watch):
    """The server's process tree read by our own CPU probe, so its memory and CPU share mean
    what ours mean; its token count from its own counter, where it has one."""

    def __init__(self, target: OutsideServerTarget, raw_prefix: Path) -> None:
        super().__init__(target, raw_prefix, "cpu")

    def _start(self) -> None:
        self.probe = CpuProbe(pid=self.target.process.pid)
        self.memory: list[float] = []
        self.shares: list[float] = []
        self.powers: list[float] = []
        self.energy: float | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self.target.sample_period):
            reading = self.probe.read()
            self.memory.append(reading.memory_used_bytes)
            self.shares.append(reading.utilization_ratio)
            if reading.power_watts is not None:
                self.powers.append(reading.power_watts)
                self.energy = (self.energy or 0.0) + reading.energy_joules

    def _stop(self) -> None:
        self._done.set()
        self._thread.join()
        self.target.settle()

    def _fill(self, after: scrape.Samples) -> None:
        self.reading.memory_peak_bytes = max(self.memory) if self.memory else None
        self.reading.utilization_mean = sum(self.shares) / len(self.shares) if self.shares else None
        self.reading.power_mean_w = sum(self.powers) / len(self.powers) if self.powers else None
        self.reading.energy_j = self.energy
        if self.target.tokens_counter:
            self.reading.server_tokens = _delta(self.before, after, self.target.tokens_counter)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- the outside baselines, as both drivers (compare, vllm_bench) choose and build them ----------

BASELINES = ("vllm-openai", "transformers-serve-matched", "transformers-serve-defaults", "llama-server")
# The engine each outside baseline stands beside: it runs under "auto" when that engine does.
BASELINE_PEER = {
    "vllm-openai": "vllm",
    "transformers-serve-matched": "hf-cb",
    "transformers-serve-defaults": "hf-cb",
    "llama-server": "llama-cpp",
}
# Older names still taken by --baseline.
BASELINE_ALIASES = {"transformers-serve": "transformers-serve-matched"}


def parse_baselines(text: str) -> list[str] | str:
    """``auto``, ``none``, or outside servers by name separated by commas."""
    import argparse

    text = text.strip()
    if text in ("auto", "none"):
        return text
    names = [BASELINE_ALIASES.get(part.strip(), part.strip()) for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in BASELINES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"--baseline takes auto, none, or any of {', '.join(BASELINES)} separated by commas, got {text!r}"
        )
    return names


def chosen_baselines(choice: list[str] | str, engines: list[str]) -> list[str]:
    """``auto``: each baseline whose peer engine is measured and whose software is installed."""
    if choice == "none":
        return []
    if choice != "auto":
        return [choice] if isinstance(choice, str) else list(choice)
    import importlib.util

    from engines.llama_cpp.gguf import llama_cpp_home

    installed = {
        "vllm-openai": importlib.util.find_spec("vllm") is not None,
        "llama-server": os.access(llama_cpp_home() / "bin" / "llama-server", os.X_OK),
    }
    return [name for name in BASELINES if BASELINE_PEER[name] in engines and installed.get(name, True)]


def max_model_len(config: TargetConfig) -> int:
    """The context both vLLM servers serve: the configured one, else the model's by our vllm engine's rule."""
    if config.max_model_len:
        return config.max_model_len
    import json

    from engines.model_facts import context_length
    from engines.vllm.engine import VLLMOptions

    model = json.loads((Path(config.model_path) / "config.json").read_text())
    return VLLMOptions().max_model_len_for(context_length(model))


def vllm_engine_args(config: TargetConfig) -> list[str]:
    """Our vllm engine's flags that must match vLLM's own server's (dtype, KV cache, context)."""
    return [
        "--dtype",
        config.vllm_dtype,
        "--kv-cache-gb",
        f"{config.kv_cache_gb:g}",
        "--max-model-len",
        str(max_model_len(config)),
    ]


def baseline_target(name: str, config: TargetConfig, raw: Path) -> OutsideServerTarget:
    """An outside server set up as its peer engine is: the same dtype, KV cache and context."""
    log_path = raw / f"{name}_server.log"
    if name == "vllm-openai":
        return VLLMServerTarget(
            config.model_path,
            config.model,
            config.vllm_dtype,
            log_path,
            config.sample_period,
            kv_cache_gb=config.kv_cache_gb,
            max_model_len=max_model_len(config),
            extra_args=list(config.baseline_args),
        )
    if name == "llama-server":
        return LlamaServerTarget(config, log_path)
    if name == "transformers-serve-defaults":
        return TransformersServeDefaultsTarget(
            config.model_path,
            config.dtype,
            log_path,
            config.sample_period,
            list(config.transformers_serve_defaults_args),
        )
    return TransformersServeTarget(
        config.model_path, config.dtype, log_path, config.sample_period, list(config.transformers_serve_args)
    )
