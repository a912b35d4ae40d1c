"""One short run on a CUDA machine that checks the CUDA paths and prints a table.

What it checks: the three HF engines on CUDA through the real gRPC server (kernel that
ran, tokens/s, TTFT), hf-kv and hf-flash with ``--compile`` (static cache, CUDA graphs),
transformers' own ``generate`` with a dynamic and with a static compiled cache as the
batch-1 reference (bench/compile_speed.py), the NVML series on /metrics while they
generate (memory, peak, utilisation, power, energy, torch allocator), and greedy
agreement of the engines on CUDA.  The weights are random at SmolLM2-135M's shape (the GPU machine has no network
and the real checkpoint is too large to carry); speed and kernels do not depend on them.
Run it with scripts/gpu_check.sh; it needs no vllm and no flash-attn.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest.launch.server_process import ServerProcess  # noqa: E402
from loadtest.measure import scrape  # noqa: E402
from loadtest.measure.prompts import LOG_SPEED_PROMPTS  # noqa: E402
from loadtest.measure.stream_clock import StreamClock  # noqa: E402
from loadtest.measure.tables import markdown_table  # noqa: E402
from server.grpc.wire import pb  # noqa: E402

NEW_TOKENS = 128
NAN = float("nan")


def build_random_model(shape_folder: Path, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shape_folder), dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(shape_folder).save_pretrained(out)
    return out


def run_engine(engine: str, model: Path, dtype: str, extra: tuple[str, ...] = ()) -> dict:
    server = ServerProcess(
        "--engine",
        engine,
        "--model",
        str(model),
        "--device",
        "cuda",
        "--dtype",
        dtype,
        "--device-sample-period",
        "0.25",
        *extra,
    ).wait_ready(300)
    try:
        info = server.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
        server.generate("warm up", max_new_tokens=8, timeout=120)
        busy = {"util": 0.0, "power": 0.0}
        done = threading.Event()

        def watch():
            while not done.wait(0.3):
                seen = scrape.read(server.metrics_port)
                busy["util"] = max(busy["util"], scrape.total(seen, "yayi_device_utilization_ratio") or 0.0)
                busy["power"] = max(busy["power"], scrape.total(seen, "yayi_device_power_watts") or 0.0)

        watcher = threading.Thread(target=watch)
        watcher.start()
        runs = []
        for prompt in LOG_SPEED_PROMPTS:
            clock = StreamClock()
            runs.append(clock.read(server.stream(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, timeout=300)))
        done.set()
        watcher.join()
        time.sleep(0.6)
        final = scrape.read(server.metrics_port)

        def final_value(name: str) -> float:
            value = scrape.total(final, name)
            return NAN if value is None else value

        greedy = list(server.generate(LOG_SPEED_PROMPTS[0], max_new_tokens=32, ignore_eos=True, timeout=120).token_ids)
        return {
            "engine": " ".join([engine, *extra[:1]]),
            "dtype": info.dtype,
            "device": info.device,
            "attention": info.attention,
            "tok_s": sum(NEW_TOKENS / r.duration_s for r in runs) / len(runs),
            "ttft_ms": sum(r.ttft_s * 1000 for r in runs) / len(runs),
            "mem_mb": final_value("yayi_device_memory_used_bytes") / 2**20,
            "peak_mb": final_value("yayi_device_memory_peak_bytes") / 2**20,
            "torch_peak_mb": final_value("yayi_torch_memory_peak_allocated_bytes") / 2**20,
            "util_max": busy["util"],
            "power_max": busy["power"],
            "energy_j": final_value("yayi_energy_joules_total"),
            "greedy": greedy,
        }
    finally:
        server.stop()


def batch_one_reference(model: Path, served: list[dict]) -> str:
    """transformers' generate, dynamic and static (compiled) cache, beside the served rows, as ratios."""
    from bench.compile_speed import ENGINE_ATTENTION, generate_speed, ratios, table

    rows = []
    for attention in ("eager", "sdpa"):
        for cache in ("dynamic", "static"):
            print(f"# generate, {attention}, {cache} cache ...", flush=True)
            try:
                rows.append(generate_speed(model, attention, cache, "bfloat16", "cuda", NEW_TOKENS))
            except Exception as exc:
                rows.append(
                    {
                        "what": f"generate {attention} {cache}: error {str(exc)[-200:]}",
                        "attention": attention,
                        "cache": cache,
                        "tokens_per_s": NAN,
                    }
                )
    for row in served:
        engine = row["engine"].split()[0]
        if engine in ENGINE_ATTENTION and "error" not in row:
            rows.append(
                {
                    "what": f"served {row['engine']}",
                    "attention": ENGINE_ATTENTION[engine],
                    "kernel": row["attention"],
                    "cache": "static" if "--compile" in row["engine"] else "dynamic",
                    "tokens_per_s": row["tok_s"],
                }
            )
    return table(ratios(rows))


def results_table(rows: list[dict]) -> str:
    # An engine that failed shows its error where its device would be, the rest of its row empty.
    shown = [{**r, "device": f"error: {r['error']}"} if "error" in r else r for r in rows]
    return markdown_table(
        shown,
        [
            "engine",
            "dtype",
            "device",
            "attention",
            "tok_s",
            "ttft_ms",
            "mem_mb",
            "peak_mb",
            "torch_peak_mb",
            "util_max",
            "power_max",
            "energy_j",
        ],
        {
            "attention": "attention kernel (seen)",
            "tok_s": "tokens/s",
            "ttft_ms": "TTFT ms",
            "mem_mb": "NVML mem MB",
            "peak_mb": "NVML peak MB",
            "torch_peak_mb": "torch peak MB",
            "util_max": "util max",
            "power_max": "power max W",
            "energy_j": "energy J",
        },
    )


def main() -> None:
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    import torch
    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, device {torch.cuda.get_device_name(0)}",
        flush=True,
    )
    print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout, flush=True)
    carried = ROOT / ".gpu_carry" / "models"
    model = build_random_model(carried / "smollm2-shape", Path("/tmp/yayi-gpu/smollm2-shape-random"))
    rows = []
    compiled = ("--compile", "--compile-buckets", "256")  # one bucket: one graph to warm up, within the time limit
    for engine, dtype, extra in [
        ("hf-eager", "bfloat16", ()),
        ("hf-kv", "bfloat16", ()),
        ("hf-flash", "bfloat16", ()),
        ("hf-kv", "bfloat16", compiled),
        ("hf-flash", "bfloat16", compiled),
    ]:
        print(f"# {engine} {dtype} {' '.join(extra)} ...", flush=True)
        try:
            rows.append(run_engine(engine, model, dtype, extra))
        except Exception as exc:  # one failing engine must not hide the others' results
            rows.append({"engine": engine, "dtype": dtype, "error": str(exc)[-400:]})
    reference = batch_one_reference(model, rows)
    lines = [
        f"GPU check: {torch.cuda.get_device_name(0)}, random weights at SmolLM2-135M shape, "
        f"greedy, {NEW_TOKENS} new tokens, ignore_eos, one request at a time, mean of "
        f"{len(LOG_SPEED_PROMPTS)} prompts",
        "",
        results_table(rows),
    ]
    ok = {(r["engine"], r["dtype"]): r["greedy"] for r in rows if "greedy" in r}
    for dtype in ("float32", "bfloat16"):
        pairs = [(a, b) for a in ok for b in ok if a[1] == b[1] == dtype and a[0] < b[0]]
        for a, b in pairs:
            same = sum(x == y for x, y in zip(ok[a], ok[b]))
            lines.append(f"greedy agreement {a[0]} vs {b[0]} ({dtype}): {same}/{len(ok[a])} tokens identical")
    lines += ["", "Batch 1 against transformers' generate (same cache kind and attention, bf16):", "", reference]
    lines += ["", "hf-cb against transformers' generate_batch, 64 requests x 128 tokens, CUDA graphs, bf16:", ""]
    try:
        from bench.hf_cb_batch import run as hf_cb_batch

        lines += [f"| {r['what']} | {r['tokens_per_s']:.2f} |" for r in hf_cb_batch(str(model), "cuda", "bfloat16")]
    except Exception as exc:  # the lines above must still be printed
        lines.append(f"hf-cb batch run failed: {str(exc)[-400:]}")
    table = "\n".join(lines)
    print(table, flush=True)
    (out_dir / "gpu_check.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
