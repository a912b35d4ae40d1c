"""The log's model sizes measured through the server, beside the roofline: ``make sizes``.

    python -m bench.sizes.measure --sizes 1.6b,7b,13b,30b
    python -m bench.sizes.measure --model mine=/path/to/folder --model q4=/path/to/file.gguf   # any checkpoints

Each checkpoint that bench/sizes/build.py made (or each ``--model NAME=PATH``) is served by
``yayi-serve``: a GGUF file by ``llama-cpp``, a bfloat16 folder by ``hf-kv`` and ``vllm``.  For each
row: the start-up time to ready; the server's resident memory (its whole process tree: llama-server
and vLLM's engine core are children) idle and at its peak under load, the log's Mem column; prefill
tokens/s of one prompt of 128 and of 512 tokens (the server's own time to first token); decode
tokens/s at 1 and at 4 users, greedy, ``--decode-tokens`` tokens each, through gRPC streaming (each
stream's tokens after its first over the time between its first and last token, summed over the
streams); and the decode bound of this machine for the bytes that really run (a Q4_0 file's own
quantised bytes, a bfloat16 folder's two bytes a weight, the KV cache beside them), from a probe of
this machine's copy bandwidth and GEMM speed at the run's start.  A size whose bfloat16 weights do
not fit is offered to the server anyway, from a folder that holds only its config and tokenizer,
so the server's memory check says in its own words why it refuses; that line is the row.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.roofline import LOG_ROW, load_shape
from bench.sizes.build import FORMATS, bf16_folder, gguf_path, hf_config, hf_tensors, tokenizer_folder
from bench.sizes.vocabulary import resized, smollm2_vocabulary, write_tokenizer_folder
from loadtest.launch.server_process import ServerProcess
from loadtest.measure import roofline as rl
from loadtest.measure.gguf_file import read_weights
from loadtest.measure.report_folder import Report
from server.device_sampler import CpuProbe

ENGINES_FOR = {"Q4_0": ["llama-cpp"], "Q8_0": ["llama-cpp"], "bf16": ["hf-kv", "vllm"]}
PROMPT_TEXT_FILE = Path(__file__).resolve().parents[2] / "loadtest" / "evaluation" / "tasks" / "source.txt"
LOG_PROMPT = "Hey, are you conscious? Can you talk to me?"
KV_BYTES_LLAMA_CPP = 2  # llama.cpp's f16 cache
SLOTS = 4  # every row's server takes this many requests at once: the 4-user decode fills them
CANCEL_TOKENS = 256  # the answers cut by the cancel check: long against a first token, within any context here


@dataclass
class Row:
    model: str
    size_b: float
    fmt: str
    engine: str
    startup_s: float | None = None
    mem_idle_mb: float | None = None
    mem_peak_mb: float | None = None
    prefill_128: float | None = None
    prefill_512: float | None = None
    decode_1: float | None = None
    decode_4: float | None = None
    cancel_s: float | None = None  # 4 streams cut mid-answer: seconds until a new request's first token
    bound_1: float | None = None
    pct_bound_1: float | None = None
    weights_mb: float | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)


class PeakMemory:
    """The server tree's resident memory, sampled on a thread: the highest seen since start."""

    def __init__(self, pid: int, period_s: float = 0.25) -> None:
        self.probe, self.peak, self.period_s = CpuProbe(pid), 0.0, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> float:
        return self.probe.read().memory_used_bytes

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak = max(self.peak, self.now())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def prompt_of(tokenizer, tokens: int) -> str:
    """Text of about ``tokens`` tokens of this model's tokenizer, cut from the repo's own prose."""
    text = PROMPT_TEXT_FILE.read_text()
    ids = tokenizer(text)["input_ids"]
    while len(ids) < tokens:
        ids = ids + ids
    return tokenizer.decode(ids[:tokens])


def decode_rate(server: ServerProcess, users: int, tokens: int, timeout: float) -> float:
    """Streams at once; each stream's decode tokens/s (after its first token), summed."""
    rates: list[float] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            first = last = None
            count = 0
            for chunk in server.stream(LOG_PROMPT, timeout=timeout, max_new_tokens=tokens, ignore_eos=True):
                if chunk.token_ids:
                    now = time.monotonic()
                    first = first or now
                    last = now
                    count += len(chunk.token_ids)
            rates.append((count - 1) / (last - first))
        except BaseException as error:  # reported below, with the row
            errors.append(error)

    threads = [threading.Thread(target=one) for _ in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return sum(rates)


def cancel_then_serve(server: ServerProcess, streams: int, timeout: float) -> float:
    """``streams`` long answers (every slot) cut after their first token; then the seconds until a new
    request's first token.  A slot still held by a cut stream would make it wait for a whole answer."""
    calls = [
        server.stream(LOG_PROMPT, timeout=timeout, max_new_tokens=CANCEL_TOKENS, ignore_eos=True)
        for _ in range(streams)
    ]
    for call in calls:
        next(call)  # its first token: the slot is taken and generating
    for call in calls:
        call.cancel()
    started = time.monotonic()
    for chunk in server.stream(LOG_PROMPT, timeout=timeout, max_new_tokens=2):
        if chunk.token_ids:
            return time.monotonic() - started
    raise RuntimeError("the request after the cancelled ones streamed no token")


def prefill_rate(server: ServerProcess, prompt: str, timeout: float) -> tuple[float, int]:
    response = server.generate(prompt, timeout=timeout, max_new_tokens=1, ignore_eos=True)
    return response.usage.prompt_tokens / (response.ttft_ms / 1000), response.usage.prompt_tokens


def measure_row(row: Row, path: Path, args, tokenizer, device: rl.Device | None, shape: rl.ModelShape | None) -> Row:
    extra = ["--max-concurrency", str(SLOTS), "--max-queue", str(2 * SLOTS)]
    if row.engine != "llama-cpp":
        extra += ["--dtype", "bfloat16"]
    if row.engine == "llama-cpp":
        extra += ["--context", str(args.context)]
    started = time.monotonic()
    server = ServerProcess("--engine", row.engine, "--model", str(path), *extra, *args.server_args)
    try:
        try:
            server.wait_ready(args.ready_timeout)
        except Exception:
            row.notes = _last_error(server) or "did not become ready"
            return row
        row.startup_s = time.monotonic() - started
        time.sleep(2.0)  # settle: the child's pages touched at start are counted once, not mid-load
        memory = PeakMemory(server.process.pid)
        row.mem_idle_mb = memory.now() / 1e6
        server.generate(LOG_PROMPT, timeout=args.request_timeout, max_new_tokens=2)  # warm-up
        for tokens in args.prompt_tokens:
            rate, real = prefill_rate(server, prompt_of(tokenizer, tokens), args.request_timeout)
            setattr(row, f"prefill_{tokens}", rate) if tokens in (128, 512) else row.extra.update({tokens: rate})
            if real != tokens:
                row.extra[f"prompt_tokens_{tokens}"] = real
        for users in args.users:
            rate = decode_rate(server, users, args.decode_tokens, args.request_timeout)
            setattr(row, f"decode_{users}", rate) if users in (1, 4) else row.extra.update({f"decode_{users}": rate})
        row.mem_peak_mb = max(memory.stop(), memory.now()) / 1e6
        row.cancel_s = cancel_then_serve(server, SLOTS, args.request_timeout)
    finally:
        server.stop()
    if device is not None and shape is not None and row.decode_1:
        per_param, weights = bytes_per_param(row, path, shape)
        row.weights_mb = weights / 1e6
        context = LOG_PROMPT_TOKENS + args.decode_tokens // 2
        row.bound_1 = rl.decode_bound_tokens_per_s(
            shape, device, 1, context, bytes_per_param=per_param, kv_bytes_per_value=2
        )
        row.pct_bound_1 = 100 * row.decode_1 / row.bound_1
    return row


LOG_PROMPT_TOKENS = 16  # the log's prompt is about a dozen tokens; the bound's context is dominated by the output


def peer_row(row: Row, path: Path, args, device: rl.Device | None, shape: rl.ModelShape | None) -> Row:
    """llama.cpp's own llama-server on the same file with the same threads, slots and context, as
    ``make compare`` starts it, beside our llama-cpp engine: both up at once (one file, mapped once by
    the page cache), decode tokens/s of one stream of ``--decode-tokens`` on each in turn for
    ``--peer-rounds`` rounds, ours first.  The peer row gets the median of its rounds; ``row`` (ours)
    gets its own rounds' median, the rounds and the median of the per-round ratios in its extra."""
    import statistics

    from loadtest.compare.targets import LlamaServerTarget, TargetConfig

    peer = Row(row.model, row.size_b, row.fmt, "llama-server")
    server_args = ("--max-concurrency", str(SLOTS), "--context", str(args.context), *args.server_args)
    config = TargetConfig(
        model=str(path),
        model_path=str(path),
        dtype="auto",
        vllm_dtype="auto",
        kv_cache_gb=1.0,
        max_model_len=None,
        sample_period=1.0,
        server_args=server_args,
    )
    log = Path(args.out or ".") / f"llama-server-{row.model}-{row.fmt}.log"
    target = LlamaServerTarget(config, log)
    ours = ServerProcess("--engine", "llama-cpp", "--model", str(path), *server_args)
    try:
        ours.wait_ready(args.ready_timeout)
        started = time.monotonic()
        target.start(args.ready_timeout)
        peer.startup_s = time.monotonic() - started
        rounds: list[tuple[float, float]] = []
        for _ in range(args.peer_rounds):
            mine = decode_rate(ours, 1, args.decode_tokens, args.request_timeout)
            rounds.append((mine, _peer_decode(target, args)))
        peer.decode_1 = statistics.median(theirs for _, theirs in rounds)
        row.extra["interleaved"] = {
            "ours": [round(mine, 3) for mine, _ in rounds],
            "llama_server": [round(theirs, 3) for _, theirs in rounds],
            "ratio_median": round(statistics.median(mine / theirs for mine, theirs in rounds), 3),
        }
        ratios = [mine / theirs for mine, theirs in rounds]
        peer.notes = (
            f"llama.cpp's own server, the same file and settings, {len(rounds)} rounds interleaved with ours: "
            f"ours / llama-server {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        )
    except Exception as error:  # the row says why
        peer.notes = f"llama-server: {error}"
    finally:
        target.stop()
        ours.stop()
    if device is not None and shape is not None and peer.decode_1:
        per_param, weights = bytes_per_param(peer, path, shape)
        peer.weights_mb = weights / 1e6
        peer.bound_1 = rl.decode_bound_tokens_per_s(
            shape,
            device,
            1,
            LOG_PROMPT_TOKENS + args.decode_tokens // 2,
            bytes_per_param=per_param,
            kv_bytes_per_value=2,
        )
        peer.pct_bound_1 = 100 * peer.decode_1 / peer.bound_1
    return peer


def _peer_decode(target, args) -> float:
    """One stream's decode tokens/s from llama-server, timed here as ``decode_rate`` times ours."""
    import requests

    body = {
        "model": target.served_name,
        "prompt": LOG_PROMPT,
        "max_tokens": args.decode_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    stamps = []
    with requests.post(
        f"{target.host}/v1/completions",
        json=body,
        stream=True,
        timeout=args.request_timeout,
        headers={"Connection": "close"},
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines(chunk_size=None):
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunk = json.loads(line[6:])
                if any(c.get("text") for c in chunk.get("choices") or ()):
                    stamps.append(time.monotonic())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def bytes_per_param(row: Row, path: Path, shape: rl.ModelShape) -> tuple[float, float]:
    """What a decode step reads per streamed weight, and the weights' bytes: a GGUF's own, tensor by tensor."""
    if row.fmt == "bf16":
        return 2.0, shape.params * 2.0
    weights = read_weights(path)
    return weights.streamed_bytes / shape.streamed_params, float(weights.total_bytes)


def _last_error(server: ServerProcess) -> str:
    server.stop()
    lines = [line.strip() for line in server.lines if line.strip()]
    return lines[-1] if lines else ""


def refusal_row(shape: rl.ModelShape, args) -> Row:
    """A size whose bf16 weights do not fit, offered to the server as its config, tokenizer and a sparse
    safetensors file: the real header (every tensor's name, dtype, shape and offsets) before a hole the
    size of the weights, which takes no disk, so the memory check sizes it as it would the real folder."""
    folder = bf16_folder(shape).with_name(f"{shape.name}-bf16-header-only")
    folder.mkdir(parents=True, exist_ok=True)
    vocabulary = resized(smollm2_vocabulary(), shape.vocab)
    config = hf_config(shape, vocabulary)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor_shape in hf_tensors(config):
        size = 2 * int(np.prod(tensor_shape))
        header[name] = {"dtype": "BF16", "shape": list(tensor_shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(folder / "model.safetensors", "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little") + raw)
        handle.truncate(8 + len(raw) + offset)
    from engines.models import resolve_model

    write_tokenizer_folder(vocabulary, resolve_model("smollm2-135m"), folder)
    row = Row(shape.name, shape.params / 1e9, "bf16", "hf-kv")
    server = ServerProcess("--engine", "hf-kv", "--model", str(folder), "--dtype", "bfloat16", *args.server_args)
    try:
        server.wait_ready(args.ready_timeout)
        row.notes = "served: the memory check did not refuse it"
    except Exception:
        row.notes = _last_error(server) or "refused"
    finally:
        server.stop()
    return row


def tokenizer_for(path: Path, shape: rl.ModelShape | None):
    from transformers import AutoTokenizer

    if path.suffix != ".gguf":
        return AutoTokenizer.from_pretrained(path)
    if shape is not None and tokenizer_folder(shape).is_dir():
        return AutoTokenizer.from_pretrained(tokenizer_folder(shape))
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def plan(args) -> list[tuple[Row, Path, rl.ModelShape | None]]:
    rows = []
    for size in args.sizes:
        shape = load_shape(size)
        for fmt in args.formats:
            path = bf16_folder(shape) if fmt == "bf16" else gguf_path(shape, fmt)
            for engine in ENGINES_FOR[fmt]:
                if engine not in args.engines:
                    continue
                row = Row(shape.name, shape.params / 1e9, fmt, engine)
                if not path.exists():
                    row.notes = f"not built: python -m bench.sizes.build --sizes {size} --formats {fmt}"
                rows.append((row, path, shape))
    for named in args.model:
        name, _, path_text = named.partition("=")
        path = Path(path_text).expanduser()
        fmt = "gguf" if path.suffix == ".gguf" else "bf16"
        engines = ["llama-cpp"] if fmt == "gguf" else [e for e in ("hf-kv", "vllm") if e in args.engines]
        shape = rl.shape_from_hf_config(path, name) if fmt == "bf16" else None
        for engine in engines:
            rows.append((Row(name, shape.params / 1e9 if shape else 0.0, fmt, engine), path, shape))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sizes.measure", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1.6b,7b,13b,30b", type=lambda s: [x for x in s.split(",") if x])
    parser.add_argument("--formats", default=",".join(FORMATS), type=lambda s: [x for x in s.split(",") if x])
    parser.add_argument("--engines", default="llama-cpp,hf-kv,vllm", type=lambda s: s.split(","))
    parser.add_argument("--model", action="append", default=[], help="NAME=PATH: a folder or .gguf of your own, again")
    parser.add_argument("--refuse", default="13b,30b", help="sizes offered in bf16 to show the memory check's refusal")
    parser.add_argument(
        "--peer-sizes",
        default="7b",
        type=lambda s: [x for x in s.split(",") if x],
        help="sizes whose Q4_0 row gets llama.cpp's own llama-server beside it (decode, one user)",
    )
    parser.add_argument("--peer-rounds", type=int, default=3, help="interleaved rounds of ours and llama-server")
    parser.add_argument("--users", default="1,4", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--prompt-tokens", default="128,512", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--context", type=int, default=1024, help="llama-cpp's context per sequence (prompt + output)")
    parser.add_argument("--ready-timeout", type=float, default=1800.0)
    parser.add_argument("--request-timeout", type=float, default=3600.0)
    parser.add_argument("--probe-seconds", type=float, default=4.0)
    parser.add_argument("--server-args", default="", help="more yayi-serve flags for every row, as one string")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    args.server_args = args.server_args.split()
    import torch

    report = Report("sizes", args.out or None, "bench.sizes.measure", argv)
    report.text(__doc__.split("\n\n", 2)[2])
    print("# probing this machine ...", flush=True)
    devices = {
        "bf16": rl.probe_this_machine(args.probe_seconds, torch.bfloat16),
        "quantized": rl.probe_this_machine(args.probe_seconds, torch.float32),
    }
    # Rows already measured into the same --out stay: the sizes can be measured one at a time.
    raw = report.dir / "rows.json"
    rows: list[Row] = [Row(**r) for r in json.loads(raw.read_text())] if raw.is_file() else []
    done = {(r.model, r.fmt, r.engine) for r in rows if not r.notes}
    rows = [r for r in rows if (r.model, r.fmt, r.engine) in done or r.engine == "hf-kv" and r.notes]
    for row, path, shape in plan(args):
        if (row.model, row.fmt, row.engine) in done:
            continue
        if row.notes:
            rows.append(row)
            continue
        print(f"# {row.model} {row.fmt} on {row.engine} ...", flush=True)
        device = devices["bf16" if row.fmt == "bf16" else "quantized"]
        rows.append(measure_row(row, path, args, tokenizer_for(path, shape), device, shape))
        print(f"  {json.dumps(asdict(rows[-1]), default=str)}", flush=True)
        raw.write_text(json.dumps([asdict(r) for r in rows], indent=1, default=str))
        _tables(report, rows, devices)
    # llama.cpp's own server beside our llama-cpp engine, on the same Q4_0 file.
    for row, path, shape in plan(args):
        have_peer = any(r.model == row.model and r.fmt == row.fmt and r.engine == "llama-server" for r in rows)
        ours = any(r.model == row.model and r.fmt == row.fmt and r.engine == "llama-cpp" and not r.notes for r in rows)
        if row.fmt == "Q4_0" and row.engine == "llama-cpp" and row.model in args.peer_sizes and ours and not have_peer:
            print(f"# {row.model} {row.fmt} on llama-server ...", flush=True)
            rows.append(peer_row(row, path, args, devices["quantized"], shape))
            print(f"  {json.dumps(asdict(rows[-1]), default=str)}", flush=True)
            raw.write_text(json.dumps([asdict(r) for r in rows], indent=1, default=str))
    for size in [s for s in args.refuse.split(",") if s]:
        print(f"# {size} bf16: the memory check ...", flush=True)
        shape = load_shape(size)
        rows = [r for r in rows if not (r.model == shape.name and r.fmt == "bf16" and r.notes)]
        rows.append(refusal_row(shape, args))
        print(f"  {rows[-1].notes}", flush=True)
    raw.write_text(json.dumps([asdict(r) for r in rows], indent=1, default=str))
    _tables(report, rows, devices)
    _plot(report, rows)
    print(report.markdown_path)
    return 0


def _fmt(value, digits: int = 1):
    return "" if value is None else round(value, digits)


def _tables(report: Report, rows: list[Row], devices: dict) -> None:
    order = {name: i for i, name in enumerate(FORMATS)}
    rows = sorted(rows, key=lambda r: (r.size_b, order.get(r.fmt, len(order)), r.engine))
    report.sections.clear()
    report.text(__doc__.split("\n\n", 2)[2])
    report.table(
        "sizes",
        [
            {
                "Model": r.model,
                "Format": r.fmt,
                "Engine": r.engine,
                "Speed (tokens/s)": _fmt(r.decode_1, 2),
                "Mem (MB)": _fmt(r.mem_peak_mb, 0),
                "GPU-UTL (%)": "n/a (CPU)",
                "use_cache": "TRUE",
                "Pwr_usg (W)": "n/a",
                "Notes": r.notes,
                "params (B)": _fmt(r.size_b, 2),
                "start-up (s)": _fmt(r.startup_s),
                "idle MB": _fmt(r.mem_idle_mb, 0),
                "prefill 128 (tok/s)": _fmt(r.prefill_128),
                "prefill 512 (tok/s)": _fmt(r.prefill_512),
                "decode 4 users (tok/s)": _fmt(r.decode_4, 2),
                "after cancel (s)": _fmt(r.cancel_s, 2),
                "bound 1 user (tok/s)": _fmt(r.bound_1, 2),
                "% of bound": _fmt(r.pct_bound_1),
                "weights MB": _fmt(r.weights_mb, 2),
            }
            for r in rows
        ],
        title="The log's table at its sizes, measured through the server on this machine",
        note="Speed is decode tokens/s of one user, greedy; Mem is the server's resident memory at its peak "
        "under load (its whole process tree); the bound is this machine's decode roofline for the bytes the row "
        f"really reads; after cancel: {SLOTS} streams (every slot) cut after their first token, then the seconds "
        "to a new request's first token.",
    )
    report.table(
        "devices",
        [
            {"probe": name, "GB/s": round(d.bandwidth / 1e9, 1), "TFLOP/s": round(d.peak_flops / 1e12, 3)}
            for name, d in devices.items()
        ],
        title="This machine's roofs (the probe at the run's start)",
    )
    report.table(
        "log_row",
        [
            {
                "Model": "Yayi-base 7B (the log)",
                "device": "A100-80G",
                "Speed (tokens/s)": LOG_ROW["tokens_per_s"],
                "Mem (MB)": LOG_ROW["memory_mb"],
            }
        ],
        title="For scale only: the log's one filled-in row, on another machine",
    )


def _plot(report: Report, rows: list[Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[Row]] = {}
    for r in rows:
        if r.decode_1:
            series.setdefault(f"{r.engine} {r.fmt}", []).append(r)
    for label, points in series.items():
        points.sort(key=lambda r: r.size_b)
        ax.plot([r.size_b for r in points], [r.decode_1 for r in points], "o-", label=label)
        bounds = [(r.size_b, r.bound_1) for r in points if r.bound_1]
        if bounds:
            ax.plot(*zip(*bounds), "--", alpha=0.6, label=f"{label}: bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (billions)")
    ax.set_ylabel("decode tokens/s, 1 user")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    report.figure("decode_by_size", fig, "Decode tokens/s of one user against model size, with this machine's bound")


if __name__ == "__main__":
    sys.exit(main())
