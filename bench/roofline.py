"""The roofline bounds from the command line, for the model shapes kept under ``bench/shapes``.

``python -m bench.roofline`` prints the decode and prefill bounds of each shape on the
device presets and, with ``--probe``, on this machine.  The model itself (devices, shapes,
the bounds, the probe) is ``loadtest/measure/roofline.py``: yayi-compare's "% of bound" column
needs it too, and loadtest/ never imports bench/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loadtest.measure.roofline import (
    DEVICES,
    Device,
    ModelShape,
    bound_kind,
    decode_bound_tokens_per_s,
    fits,
    make_shape,
    memory_bytes,
    prefill_bound_tokens_per_s,
    probe_this_machine,
)
from loadtest.measure.tables import markdown_table

SHAPES_DIR = Path(__file__).with_name("shapes")

# The inference log's one measured row (docs/design.md): Yayi-base 7B, one A100-80G, tokens/s.
LOG_ROW = {"model": "7b", "device": "a100-80g", "tokens_per_s": 30.76, "memory_mb": 14814}


def load_shape(name_or_path: str) -> ModelShape:
    """A shape data file: a name under bench/shapes (``7b``) or a path to such a JSON file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = SHAPES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SHAPES_DIR.glob("*.json")))
        raise FileNotFoundError(f"no shape {name_or_path!r}; known: {known}")
    data = json.loads(path.read_text())
    return make_shape(data.pop("name", path.stem), **data)


def builtin_shapes() -> list[ModelShape]:
    shapes = [load_shape(str(p)) for p in SHAPES_DIR.glob("*.json")]
    return sorted(shapes, key=lambda s: s.params)


# The bounds table's column titles, here and on the roofline_measure page.
BOUNDS_HEADERS = {
    "params_b": "params (B)",
    "weights_gb": "weights GB",
    "memory_gb": "weights+KV (GB)",
    "decode_bound_tok_s": "decode bound (tok/s)",
    "decode_bound_kind": "bound by",
    "prefill_bound_tok_s": "prefill bound (tok/s)",
}


def bounds_rows(
    shapes: list[ModelShape], devices: list[Device], batch: int, context: int, prompt: int, bytes_per_param: float
) -> list[dict]:
    rows = []
    for device in devices:
        for shape in shapes:
            rows.append(
                {
                    "model": shape.name,
                    "params_b": shape.params / 1e9,
                    "device": device.name,
                    "batch": batch,
                    "context": context,
                    "weights_gb": shape.params * bytes_per_param / 1e9,
                    "memory_gb": memory_bytes(shape, batch, context, bytes_per_param) / 1e9,
                    "fits": fits(shape, device, batch, context, bytes_per_param),
                    "decode_bound_tok_s": decode_bound_tokens_per_s(shape, device, batch, context, bytes_per_param),
                    "decode_bound_kind": bound_kind(shape, device, batch, context, bytes_per_param),
                    "prefill_bound_tok_s": prefill_bound_tokens_per_s(shape, device, batch, prompt, bytes_per_param),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default=",".join(s.name for s in builtin_shapes()),
        help="shape names under bench/shapes or JSON paths, comma-separated",
    )
    parser.add_argument("--devices", default=",".join(DEVICES), help=f"presets ({', '.join(DEVICES)})")
    parser.add_argument("--probe", action="store_true", help="add this machine, measured (a few seconds)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=512, help="tokens in each sequence's KV cache while decoding")
    parser.add_argument("--prompt", type=int, default=512, help="prompt length for the prefill bound")
    parser.add_argument("--bytes-per-param", type=float, default=2, help="2 for bf16/fp16, 4 for float32")
    args = parser.parse_args(argv)
    shapes = [load_shape(name) for name in args.models.split(",") if name]
    devices = [DEVICES[name] for name in args.devices.split(",") if name]
    if args.probe:
        devices.append(probe_this_machine())
    for device in devices:
        print(
            f"# {device.name}: {device.peak_flops / 1e12:.3g} TFLOP/s, {device.bandwidth / 1e9:.4g} GB/s, "
            f"{device.memory_bytes / 1e9:.4g} GB ({device.source})"
        )
    print(
        f"\nbatch {args.batch}, decode context {args.context}, prefill prompt {args.prompt}, "
        f"{args.bytes_per_param:g} bytes per parameter\n"
    )
    rows = bounds_rows(shapes, devices, args.batch, args.context, args.prompt, args.bytes_per_param)
    print(
        markdown_table(
            rows,
            [
                "model",
                "params_b",
                "device",
                "memory_gb",
                "fits",
                "decode_bound_tok_s",
                "decode_bound_kind",
                "prefill_bound_tok_s",
            ],
            BOUNDS_HEADERS,
        )
    )


if __name__ == "__main__":
    main()
