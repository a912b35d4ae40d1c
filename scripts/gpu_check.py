"""One short run on a CUDA machine that checks the CUDA paths and prints a table.

What it checks: the three HF engines on CUDA through the real gRPC server (kernel that
ran, tokens/s, TTFT), the NVML series on /metrics while they generate (memory, peak,
utilisation, power, energy, torch allocator), and greedy agreement of the engines on
CUDA.  The weights are random at SmolLM2-135M's shape (the GPU machine has no network
and the real checkpoint is too large to carry); speed and kernels do not depend on them.
Run it with scripts/gpu_check.sh; it needs no vllm and no flash-attn.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from loadtest.server_process import ServerProcess  # noqa: E402
from server.wire import pb  # noqa: E402

PROMPTS = ["Hey, are you conscious? Can you talk to me?", "I feel so bad today, what should I do?",
           "I've won an award today, I'm in a good mood"]
NEW_TOKENS = 128


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


def scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name.startswith(("yayi_device", "yayi_energy", "yayi_torch", "yayi_generation_tokens")):
                values[sample.name] = sample.value
    return values


def run_engine(engine: str, model: Path, dtype: str) -> dict:
    server = ServerProcess("--engine", engine, "--model", str(model), "--device", "cuda", "--dtype", dtype,
                           "--device-sample-period", "0.25").wait_ready(300)
    try:
        info = server.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
        server.generate("warm up", max_new_tokens=8, timeout=120)
        busy = {"util": 0.0, "power": 0.0}
        done = threading.Event()

        def watch():
            while not done.wait(0.3):
                seen = scrape(server.metrics_port)
                busy["util"] = max(busy["util"], seen.get("yayi_device_utilization_ratio", 0.0))
                busy["power"] = max(busy["power"], seen.get("yayi_device_power_watts", 0.0))

        watcher = threading.Thread(target=watch)
        watcher.start()
        rates, ttfts = [], []
        for prompt in PROMPTS:
            started = time.perf_counter()
            first = None
            for chunk in server.stream(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, timeout=300):
                if first is None and chunk.token_ids:
                    first = time.perf_counter()
            rates.append(NEW_TOKENS / (time.perf_counter() - started))
            ttfts.append((first - started) * 1000)
        done.set()
        watcher.join()
        time.sleep(0.6)
        final = scrape(server.metrics_port)
        greedy = list(server.generate(PROMPTS[0], max_new_tokens=32, ignore_eos=True, timeout=120).token_ids)
        return {"engine": engine, "dtype": info.dtype, "device": info.device, "attention": info.attention,
                "tok_s": sum(rates) / len(rates), "ttft_ms": sum(ttfts) / len(ttfts),
                "mem_mb": final.get("yayi_device_memory_used_bytes", float("nan")) / 2**20,
                "peak_mb": final.get("yayi_device_memory_peak_bytes", float("nan")) / 2**20,
                "torch_peak_mb": final.get("yayi_torch_memory_peak_allocated_bytes", float("nan")) / 2**20,
                "util_max": busy["util"], "power_max": busy["power"],
                "energy_j": final.get("yayi_energy_joules_total", float("nan")), "greedy": greedy}
    finally:
        server.stop()


def main() -> None:
    out_dir = Path(os.environ.get("OUT", "/tmp"))
    import torch
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"device {torch.cuda.get_device_name(0)}", flush=True)
    print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout, flush=True)
    carried = ROOT / ".gpu_carry" / "models"
    model = build_random_model(carried / "smollm2-shape", Path("/tmp/yayi-gpu/smollm2-shape-random"))
    rows = []
    for engine, dtype in [("hf-eager", "bfloat16"), ("hf-kv", "bfloat16"), ("hf-flash", "bfloat16"),
                          ("hf-kv", "float32"), ("hf-flash", "float32")]:
        print(f"# {engine} {dtype} ...", flush=True)
        try:
            rows.append(run_engine(engine, model, dtype))
        except Exception as exc:  # one failing engine must not hide the others' results
            rows.append({"engine": engine, "dtype": dtype, "error": str(exc)[-400:]})
    lines = [
        f"GPU check: {torch.cuda.get_device_name(0)}, random weights at SmolLM2-135M shape, "
        f"greedy, {NEW_TOKENS} new tokens, ignore_eos, one request at a time, mean of 3 prompts",
        "",
        "| engine | dtype | device | attention kernel (seen) | tokens/s | TTFT ms | NVML mem MB | NVML peak MB "
        "| torch peak MB | util max | power max W | energy J |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['dtype']} | error: {r['error']} |")
            continue
        lines.append(f"| {r['engine']} | {r['dtype']} | {r['device']} | {r['attention']} | {r['tok_s']:.1f} | "
                     f"{r['ttft_ms']:.1f} | {r['mem_mb']:.0f} | {r['peak_mb']:.0f} | {r['torch_peak_mb']:.0f} | "
                     f"{r['util_max']:.2f} | {r['power_max']:.0f} | {r['energy_j']:.0f} |")
    ok = {(r["engine"], r["dtype"]): r["greedy"] for r in rows if "greedy" in r}
    for dtype in ("float32", "bfloat16"):
        pairs = [(a, b) for a in ok for b in ok if a[1] == b[1] == dtype and a[0] < b[0]]
        for a, b in pairs:
            same = sum(x == y for x, y in zip(ok[a], ok[b]))
            lines.append(f"greedy agreement {a[0]} vs {b[0]} ({dtype}): {same}/{len(ok[a])} tokens identical")
    table = "\n".join(lines)
    print(table, flush=True)
    (out_dir / "gpu_check.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
