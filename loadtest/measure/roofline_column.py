"""The report's "% of bound" column: measured tokens/s over the decode roofline bound.

On a CPU the bound comes from a probe of this machine at the run's start (copy bandwidth,
GEMM FLOP/s, per dtype, since bf16 GEMMs run at another speed than fp32); on CUDA from the
datasheet preset whose name matches the GPU, or n/a when none does.

The bytes a step reads are those of what the row's server really runs (its ``dtype`` and
``model_path`` as it reported them): a checkpoint at float32 or bfloat16 is its parameters at
that width; a GGUF (llama-cpp, llama-server) is its own tensors' stored bytes, each at its own
quantisation, with llama.cpp's f16 KV cache.  So a Q4_1 row is measured against its quarter-size
weights, not against the bf16 bound it would beat by construction.
"""

from __future__ import annotations

from loadtest.measure.gguf_file import GGUFWeights, read_weights
from loadtest.measure.roofline import DEVICES, decode_bound_tokens_per_s, probe_this_machine, shape_from_hf_config

BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2}
# llama.cpp's KV cache type unless told otherwise (--cache-type-k/-v f16).
GGUF_KV_BYTES = 2
# A GGUF file type named as its plain dtype, for the probe that measured that dtype's GEMMs.
GGUF_PLAIN_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
# Quantized weights have no GEMM probe of their own (llama.cpp runs integer dot products on them):
# their compute roof is the float32 probe's.
QUANTIZED_PROBE_DTYPE = "float32"


class RooflineColumn:
    def __init__(self, model_path: str, context: int) -> None:
        self.shape = shape_from_hf_config(model_path)
        self.context = context
        self.cpu_devices: dict = {}
        self.gguf: dict[str, GGUFWeights] = {}  # by file path: the GGUFs the run's rows served

    def probe(self, dtypes: set[str], seconds: float) -> None:
        import torch

        for dtype in sorted(dtypes):
            if dtype in BYTES_PER_PARAM:
                self.cpu_devices[dtype] = probe_this_machine(seconds=seconds, dtype=getattr(torch, dtype))

    def probe_dtype(self, row: dict) -> str | None:
        """Which dtype's probe is the row's device: its own, or for a quantized GGUF the float32 one."""
        dtype = row.get("dtype") or ""
        if dtype in BYTES_PER_PARAM:
            return dtype
        if dtype in GGUF_PLAIN_DTYPES:
            return GGUF_PLAIN_DTYPES[dtype]
        return QUANTIZED_PROBE_DTYPE if self.weights_of(row) is not None else None

    def device_for(self, row: dict):
        if row.get("device", "").startswith("cuda"):
            import torch

            gpu = torch.cuda.get_device_name(0).lower() if torch.cuda.is_available() else ""
            return next((device for key, device in DEVICES.items() if key.split("-")[0] in gpu), None)
        return self.cpu_devices.get(self.probe_dtype(row))

    def weights_of(self, row: dict) -> GGUFWeights | None:
        """The row's GGUF file, read once per run; None for a checkpoint folder."""
        path = str(row.get("model_path") or "")
        if not path.endswith(".gguf"):
            return None
        if path not in self.gguf:
            self.gguf[path] = read_weights(path)
        return self.gguf[path]

    def bytes_for(self, row: dict) -> tuple[float, float] | None:
        """(bytes per streamed parameter, bytes per KV value) of what the row runs, or None when unknown."""
        weights = self.weights_of(row)
        if weights is not None:
            return weights.streamed_bytes / self.shape.streamed_params, GGUF_KV_BYTES
        per_param = BYTES_PER_PARAM.get(row.get("dtype") or "")
        return None if per_param is None else (per_param, per_param)

    def fill(self, row: dict) -> None:
        device = self.device_for(row)
        sizes = self.bytes_for(row)
        if device is None or sizes is None or not row.get("speed_tokens_per_s"):
            row["bound_tokens_per_s"] = row["pct_of_bound"] = None
            return
        per_param, per_kv_value = sizes
        bound = decode_bound_tokens_per_s(
            self.shape,
            device,
            batch=row["users"],
            context=self.context,
            bytes_per_param=per_param,
            kv_bytes_per_value=per_kv_value,
        )
        row["bound_tokens_per_s"] = bound
        row["pct_of_bound"] = 100 * row["speed_tokens_per_s"] / bound

    def describe(self) -> list[str]:
        lines = [
            f"model shape from {self.shape.source}: {self.shape.params / 1e6:.1f} M parameters, "
            f"{self.shape.layers} layers; decode context taken as {self.context} tokens"
        ]
        for dtype, device in sorted(self.cpu_devices.items()):
            lines.append(
                f"{dtype}: {device.bandwidth / 1e9:.1f} GB/s, {device.peak_flops / 1e9:.1f} GFLOP/s ({device.source})"
            )
        lines.append(
            "bound at batch b = min(bandwidth × b / bytes read per step, FLOP/s / FLOPs per token); "
            "bytes per step = weights + the batch's KV cache"
        )
        for weights in self.gguf.values():
            lines.append(
                f"GGUF rows ({weights.path.name}): weights are the file's own tensors, {weights.describe()}, "
                f"KV cache at f16 (llama.cpp's default); quantized weights take the {QUANTIZED_PROBE_DTYPE} GEMM "
                "probe as their compute roof (llama.cpp's integer kernels are not probed)"
            )
        return lines
