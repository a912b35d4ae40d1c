"""Our server as a target: one engine, loaded through one front end (``api``: gRPC, or the
OpenAI-compatible HTTP one), watched through its own /metrics."""

from __future__ import annotations

from pathlib import Path

from loadtest.compare.targets.base import Watch, counter_delta
from loadtest.launch.server_process import ROOT, ServerProcess
from loadtest.measure import scrape

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


class MetricsWatch(Watch):
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
        self.reading.energy_j = counter_delta(self.before, after, "yayi_energy_joules_total")
        self.reading.server_tokens = counter_delta(self.before, after, "yayi_generation_tokens_total")
