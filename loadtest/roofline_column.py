"""The report's "% of bound" column: measured tokens/s over the decode roofline bound.

On a CPU the bound comes from a probe of this machine at the run's start (copy bandwidth,
GEMM FLOP/s, per dtype, since bf16 GEMMs run at another speed than fp32); on CUDA from the
datasheet preset whose name matches the GPU, or n/a when none does.
"""

from __future__ import annotations

from loadtest.roofline import DEVICES, decode_bound_tokens_per_s, probe_this_machine, shape_from_hf_config

BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2}


class RooflineColumn:
    def __init__(self, model_path: str, context: int) -> None:
        self.shape = shape_from_hf_config(model_path)
        self.context = context
        self.cpu_devices: dict = {}

    def probe(self, dtypes: set[str], seconds: float) -> None:
        import torch

        for dtype in sorted(dtypes):
            if dtype in BYTES_PER_PARAM:
                self.cpu_devices[dtype] = probe_this_machine(seconds=seconds, dtype=getattr(torch, dtype))

    def device_for(self, row: dict):
        if row.get("device", "").startswith("cuda"):
            import torch

            gpu = torch.cuda.get_device_name(0).lower() if torch.cuda.is_available() else ""
            return next((device for key, device in DEVICES.items() if key.split("-")[0] in gpu), None)
        return self.cpu_devices.get(row.get("dtype"))

    def fill(self, row: dict) -> None:
        device = self.device_for(row)
        bytes_per_param = BYTES_PER_PARAM.get(row.get("dtype"))
        if device is None or bytes_per_param is None or not row.get("speed_tokens_per_s"):
            row["bound_tokens_per_s"] = row["pct_of_bound"] = None
            return
        bound = decode_bound_tokens_per_s(
            self.shape, device, batch=row["users"], context=self.context, bytes_per_param=bytes_per_param
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
        return lines
