"""llama.cpp's own ``llama-server`` beside our llama-cpp rows, set up from the same flags as our
engine's child."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from loadtest.compare.targets.base import OutsideServerTarget, TargetConfig
from loadtest.measure import scrape


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
        repack=options.repacks(),
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

    def _binary_and_file(self) -> list[str]:
        """Set up at start, not when the run is planned: a bad flag or a missing build is this row's
        failure, and the GGUF (converted once for a dtype) is made only when it is served.  The
        command's head: the binary, the file and the name it is served under."""
        from engines.llama_cpp.gguf import llama_server_binary, resolve_gguf

        self.setup = llama_setup(self.model, self.server_args)
        gguf = resolve_gguf(self.model, self.requested_dtype)
        # What really runs, for the row's dtype and its roofline: "Q4_1", "bfloat16", ...
        self.model_path, self.dtype = str(gguf.path), gguf.weights
        return [str(llama_server_binary(self.setup.binary)), "--model", self.model_path, "--alias", self.served_name]

    def command(self) -> list[str]:
        from engines.model_facts import DEFAULT_CONTEXT
        from loadtest.measure.gguf_file import context_length

        head = self._binary_and_file()
        context = self.setup.context or min(DEFAULT_CONTEXT, context_length(Path(self.model_path)) or DEFAULT_CONTEXT)
        parallel = self.setup.parallel
        return [
            *head,
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


class LlamaServerDefaultsTarget(LlamaServerTarget):
    """llama-server as its users start it: the same GGUF, and nothing else of our engine's settings
    (its own threads, slots, context from the file, unified KV cache and batch), so a lead over it
    shows what our engine's defaults give on this machine rather than hiding in them."""

    label = "llama-server-defaults"
    name = "llama.cpp's llama-server, its own defaults"

    def command(self) -> list[str]:
        address = ["--host", "127.0.0.1", "--port", str(self.port), "--metrics"]
        return [*self._binary_and_file(), *address, *self.extra_args]
