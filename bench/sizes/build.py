"""Builds the log's model sizes once, with random weights at their real shapes, into the model cache.

    python -m bench.sizes.build --sizes 1.6b,7b,13b,30b            # make sizes-build
    python -m bench.sizes.build --sizes 7b --formats Q4_0 --dry-run  # what it would write, and the disk

Speed and memory depend on a model's shape, not on its weights, so random weights at the shapes
under bench/shapes give real figures.  Per size:

- GGUF files at a 4-bit and an 8-bit type (Q4_0, Q8_0), where they fit on disk.  They are written
  tensor by tensor: each tensor's quantised blocks are drawn at random (a valid fp16 scale, random
  quants) straight into the file, so no build holds more than one tensor in memory, and none goes
  through a float copy of the model first (a 30B model in bfloat16 would be 61 GB of disk and more
  memory than this machine has, only to be thrown away).  Norms are F32 ones, biases F32 zeros.
- A bfloat16 safetensors folder where the model fits in memory (``--formats bf16``): written shard
  by shard (2 GB each), one tensor drawn at a time, with a config transformers and vLLM load.

Llama-shaped sizes (1.6B, 13B, 30B) are written as llama.cpp's ``llama`` architecture; the 7B
(BLOOM-7b1) as its ``bloom`` architecture (fused QKV with biases, LayerNorms, ALiBi), which llama.cpp
runs through its own BLOOM graph, not the Llama one.  The vocabulary is SmolLM2's, padded or cut to
the shape's size (bench/sizes/vocabulary.py).  Before writing, the disk each file needs is printed and
compared with what is free; a file already built is kept (delete its folder to rebuild).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.roofline import load_shape
from bench.sizes.vocabulary import Vocabulary, resized, smollm2_vocabulary, write_tokenizer_folder
from engines.models import cache_root, file_lock
from loadtest.measure.roofline import ModelShape

QUANT_TYPES = ("Q4_0", "Q8_0")
FORMATS = (*QUANT_TYPES, "bf16")
# Bytes of one 32-weight block: an fp16 scale, then 16 bytes of 4-bit quants or 32 int8 quants.
BLOCK_BYTES = {"Q4_0": 18, "Q8_0": 34}
# Scales that keep the random weights' spread near an initialised model's (about 0.02).
SCALES = {"Q4_0": 0.006, "Q8_0": 0.0003}
SHARD_BYTES = 2 * 1024**3
DISK_RESERVE = 10 * 10**9
SEED = 0
# How many transformers' config classes a shape's architecture is.
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "bloom": "BloomForCausalLM"}
RMS_EPS = 1e-5


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order: (rows, columns), a matrix's rows being its outputs
    kind: str  # "matrix" (quantised), "norm" (ones) or "bias" (zeros)


def sizes_root() -> Path:
    """Under the model cache; ``YAYI_SIZES_ROOT`` moves it (a test builds its tiny shape apart)."""
    return Path(os.environ.get("YAYI_SIZES_ROOT", cache_root() / "sizes"))


def gguf_path(shape: ModelShape, qtype: str) -> Path:
    return sizes_root() / shape.name / f"{shape.name}-{qtype}.gguf"


def bf16_folder(shape: ModelShape) -> Path:
    return sizes_root() / shape.name / f"{shape.name}-bf16"


def tokenizer_folder(shape: ModelShape) -> Path:
    """The size's vocabulary for transformers, beside its GGUF files: what the measurement tokenizes prompts with."""
    return sizes_root() / shape.name / "tokenizer"


# ---- the tensors ----------------------------------------------------------------------


def gguf_tensors(shape: ModelShape) -> list[Tensor]:
    """llama.cpp's tensor names and shapes for a Llama-style or BLOOM-style shape."""
    h, d = shape.hidden, shape.dim_head
    q, kv = shape.heads * d, shape.kv_heads * d
    inter = shape.intermediate or 4 * h
    tensors = [Tensor("token_embd.weight", (shape.vocab, h), "matrix")]
    if shape.architecture == "bloom":
        tensors += [Tensor("token_embd_norm.weight", (h,), "norm"), Tensor("token_embd_norm.bias", (h,), "bias")]
    for i in range(shape.layers):
        b = f"blk.{i}"
        if shape.architecture == "bloom":
            tensors += [
                Tensor(f"{b}.attn_norm.weight", (h,), "norm"),
                Tensor(f"{b}.attn_norm.bias", (h,), "bias"),
                Tensor(f"{b}.attn_qkv.weight", (q + 2 * kv, h), "matrix"),
                Tensor(f"{b}.attn_qkv.bias", (q + 2 * kv,), "bias"),
                Tensor(f"{b}.attn_output.weight", (h, q), "matrix"),
                Tensor(f"{b}.attn_output.bias", (h,), "bias"),
                Tensor(f"{b}.ffn_norm.weight", (h,), "norm"),
                Tensor(f"{b}.ffn_norm.bias", (h,), "bias"),
                Tensor(f"{b}.ffn_up.weight", (inter, h), "matrix"),
                Tensor(f"{b}.ffn_up.bias", (inter,), "bias"),
                Tensor(f"{b}.ffn_down.weight", (h, inter), "matrix"),
                Tensor(f"{b}.ffn_down.bias", (h,), "bias"),
            ]
        else:
            tensors += [
                Tensor(f"{b}.attn_norm.weight", (h,), "norm"),
                Tensor(f"{b}.attn_q.weight", (q, h), "matrix"),
                Tensor(f"{b}.attn_k.weight", (kv, h), "matrix"),
                Tensor(f"{b}.attn_v.weight", (kv, h), "matrix"),
                Tensor(f"{b}.attn_output.weight", (h, q), "matrix"),
                Tensor(f"{b}.ffn_norm.weight", (h,), "norm"),
                Tensor(f"{b}.ffn_gate.weight", (inter, h), "matrix"),
                Tensor(f"{b}.ffn_up.weight", (inter, h), "matrix"),
                Tensor(f"{b}.ffn_down.weight", (h, inter), "matrix"),
            ]
    tensors.append(Tensor("output_norm.weight", (h,), "norm"))
    if shape.architecture == "bloom":
        tensors.append(Tensor("output_norm.bias", (h,), "bias"))
    if not shape.tie_embeddings:
        tensors.append(Tensor("output.weight", (shape.vocab, h), "matrix"))
    return tensors


def tensor_bytes(tensor: Tensor, qtype: str) -> int:
    if tensor.kind != "matrix":
        return int(np.prod(tensor.shape)) * 4
    rows, columns = tensor.shape
    return rows * (columns // 32) * BLOCK_BYTES[qtype]


def gguf_bytes(shape: ModelShape, qtype: str) -> int:
    return sum(tensor_bytes(t, qtype) for t in gguf_tensors(shape))


def random_blocks(rng: np.random.Generator, tensor: Tensor, qtype: str) -> np.ndarray:
    """A quantised matrix as raw bytes, (rows, blocks * block bytes): random quants under one fp16 scale."""
    rows, columns = tensor.shape
    blocks = rng.integers(0, 256, size=(rows, columns // 32, BLOCK_BYTES[qtype]), dtype=np.uint8)
    blocks[:, :, :2] = np.frombuffer(np.float16(SCALES[qtype]).tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def plain_tensor(tensor: Tensor) -> np.ndarray:
    return (np.ones if tensor.kind == "norm" else np.zeros)(tensor.shape, dtype=np.float32)


# ---- GGUF -----------------------------------------------------------------------------


def write_gguf(shape: ModelShape, qtype: str, vocabulary: Vocabulary, path: Path, progress=print) -> None:
    import gguf

    tensors = gguf_tensors(shape)
    partial = path.with_suffix(".partial")
    writer = gguf.GGUFWriter(partial, shape.architecture)
    arch = shape.architecture
    writer.add_name(f"yayi-sizes {shape.name} random weights")
    writer.add_file_type({"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(shape.max_context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.intermediate or 4 * shape.hidden)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_vocab_size(shape.vocab)
    if arch == "bloom":
        writer.add_layer_norm_eps(RMS_EPS)
    else:
        writer.add_layer_norm_rms_eps(RMS_EPS)
        writer.add_rope_dimension_count(shape.dim_head)
        writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.types)
    writer.add_token_merges(vocabulary.merges)
    writer.add_bos_token_id(vocabulary.bos)
    writer.add_eos_token_id(vocabulary.eos)
    writer.add_add_bos_token(False)
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    for tensor in tensors:
        if tensor.kind == "matrix":
            rows, columns = tensor.shape
            byte_shape = (rows, columns // 32 * BLOCK_BYTES[qtype])
            writer.add_tensor_info(
                tensor.name, byte_shape, np.dtype(np.uint8), tensor_bytes(tensor, qtype), raw_dtype=qt
            )
        else:
            writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor_bytes(tensor, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(SEED)
    total, done, started = gguf_bytes(shape, qtype), 0, time.monotonic()
    for tensor in tensors:
        data = random_blocks(rng, tensor, qtype) if tensor.kind == "matrix" else plain_tensor(tensor)
        writer.write_tensor_data(data)
        done += data.nbytes
        _progress(progress, path.name, done, total, started)
    writer.close()
    partial.rename(path)


_last_progress = [0.0]


def _progress(progress, what: str, done: int, total: int, started: float) -> None:
    now = time.monotonic()
    if now - _last_progress[0] < 1.0 and done < total:
        return  # one line a second is enough to show it moves
    _last_progress[0] = now
    elapsed = now - started
    left = elapsed / done * (total - done) if done else 0.0
    progress(f"  {what}: {done / 1e9:.2f} / {total / 1e9:.2f} GB, {elapsed:.0f} s, about {left:.0f} s left")


# ---- bfloat16 safetensors ---------------------------------------------------------------


def hf_config(shape: ModelShape, vocabulary: Vocabulary) -> dict:
    common = {
        "architectures": [HF_ARCHITECTURES[shape.architecture]],
        "vocab_size": shape.vocab,
        "bos_token_id": vocabulary.bos,
        "eos_token_id": vocabulary.eos,
        "tie_word_embeddings": shape.tie_embeddings,
        "torch_dtype": "bfloat16",
    }
    if shape.architecture == "bloom":
        return {
            **common,
            "model_type": "bloom",
            "hidden_size": shape.hidden,
            "n_layer": shape.layers,
            "n_head": shape.heads,
            "layer_norm_epsilon": RMS_EPS,
            "seq_length": shape.max_context,
        }
    return {
        **common,
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.dim_head,
        "max_position_embeddings": shape.max_context,
        "rms_norm_eps": RMS_EPS,
        "rope_theta": 10000.0,
    }


def hf_tensors(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The state dict's names and shapes, from transformers' own model built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    # A tied output matrix is the embedding: stored once (safetensors refuses shared storage).
    tied = {"lm_head.weight"} if config["tie_word_embeddings"] else set()
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items() if name not in tied]


def write_bf16_folder(shape: ModelShape, vocabulary: Vocabulary, folder: Path, progress=print) -> None:
    import torch
    from safetensors.torch import save_file

    from engines.models import resolve_model

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config = hf_config(shape, vocabulary)
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    (partial / "generation_config.json").write_text(
        json.dumps({"bos_token_id": vocabulary.bos, "eos_token_id": vocabulary.eos})
    )
    write_tokenizer_folder(vocabulary, resolve_model("smollm2-135m"), partial)
    tensors = hf_tensors(config)
    generator = torch.Generator().manual_seed(SEED)
    total = sum(int(np.prod(s)) * 2 for _, s in tensors)
    shards: list[dict[str, torch.Tensor]] = [{}]
    weight_map: dict[str, str] = {}
    done, started, shard_bytes = 0, time.monotonic(), 0
    names: list[str] = []

    def flush() -> None:
        index = len(names) + 1
        name = f"model-{index:05d}.safetensors"
        save_file(shards[-1], str(partial / name), metadata={"format": "pt"})
        for key in shards[-1]:
            weight_map[key] = name
        names.append(name)
        shards[-1] = {}

    for name, tensor_shape in tensors:
        if name.endswith(".bias"):
            value = torch.zeros(tensor_shape, dtype=torch.bfloat16)
        elif "norm" in name or ".ln_f." in name:
            value = torch.ones(tensor_shape, dtype=torch.bfloat16)
        else:
            value = (torch.randn(tensor_shape, generator=generator) * 0.02).to(torch.bfloat16)
        size = value.numel() * 2
        if shard_bytes and shard_bytes + size > SHARD_BYTES:
            flush()
            shard_bytes = 0
        shards[-1][name] = value
        shard_bytes += size
        done += size
        _progress(progress, folder.name, done, total, started)
    flush()
    # Shard names carry the count, as transformers writes them.
    for index, name in enumerate(names, start=1):
        final = f"model-{index:05d}-of-{len(names):05d}.safetensors"
        (partial / name).rename(partial / final)
        for key, value in list(weight_map.items()):
            if value == name:
                weight_map[key] = final
    (partial / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def bf16_bytes(shape: ModelShape) -> int:
    return shape.params * 2


# ---- the command ------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    shape: ModelShape
    fmt: str

    @property
    def path(self) -> Path:
        return bf16_folder(self.shape) if self.fmt == "bf16" else gguf_path(self.shape, self.fmt)

    @property
    def disk_bytes(self) -> int:
        return bf16_bytes(self.shape) if self.fmt == "bf16" else gguf_bytes(self.shape, self.fmt)


def plan(sizes: list[str], formats: list[str]) -> Iterator[Job]:
    for size in sizes:
        shape = load_shape(size)
        for fmt in formats:
            yield Job(shape, fmt)


def build(job: Job, progress=print) -> Path:
    job.path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(job.path.parent / ".build.lock"):
        if job.path.exists():
            return job.path
        vocabulary = resized(smollm2_vocabulary(), job.shape.vocab)
        if not tokenizer_folder(job.shape).is_dir():
            from engines.models import resolve_model

            tokenizer_folder(job.shape).mkdir()
            write_tokenizer_folder(vocabulary, resolve_model("smollm2-135m"), tokenizer_folder(job.shape))
        if job.fmt == "bf16":
            write_bf16_folder(job.shape, vocabulary, job.path, progress)
        else:
            write_gguf(job.shape, job.fmt, vocabulary, job.path, progress)
    return job.path


def default_jobs(shapes: list[ModelShape], memory: int, free: int, reserve: int = DISK_RESERVE) -> list[Job]:
    """What fits, in order of worth: the 4-bit GGUF of every size, then bfloat16 where it fits in memory
    (with room for the server beside it), then the 8-bit GGUFs, each while the disk keeps ``reserve`` free."""
    wanted = [Job(s, "Q4_0") for s in shapes]
    wanted += [Job(s, "bf16") for s in shapes if bf16_bytes(s) < 0.7 * memory]
    wanted += [Job(s, "Q8_0") for s in shapes]
    jobs, budget = [], free - reserve
    for job in wanted:
        cost = 0 if job.path.exists() else job.disk_bytes
        if cost <= budget:
            jobs.append(job)
            budget -= cost
        else:
            print(
                f"{job.shape.name} {job.fmt}: {job.disk_bytes / 1e9:.1f} GB would leave under "
                f"{reserve / 1e9:.0f} GB of disk free, skipped"
            )
    order = {fmt: i for i, fmt in enumerate(FORMATS)}
    return sorted(jobs, key=lambda j: (j.shape.params, order[j.fmt]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sizes.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1.6b,7b,13b,30b", help="shape names under bench/shapes, or JSON paths")
    parser.add_argument(
        "--formats",
        default="",
        help=f"of {', '.join(FORMATS)} (default: Q4_0 for every size, then bf16 where it fits in memory, then Q8_0, "
        "while the disk keeps 10 GB free)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would be written and the disk, then stop")
    args = parser.parse_args(argv)
    import psutil

    shapes = [load_shape(size.strip()) for size in args.sizes.split(",") if size.strip()]
    sizes_root().mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(sizes_root()).free
    if args.formats:
        unknown = [f for f in args.formats.split(",") if f not in FORMATS]
        if unknown:
            parser.error(f"--formats: {', '.join(unknown)} not among {', '.join(FORMATS)}")
        jobs = [Job(s, f) for s in shapes for f in args.formats.split(",")]
    else:
        jobs = default_jobs(shapes, psutil.virtual_memory().total, free)
    needed = sum(job.disk_bytes for job in jobs if not job.path.exists())
    for job in jobs:
        state = "built" if job.path.exists() else f"{job.disk_bytes / 1e9:.1f} GB to write"
        print(f"{job.shape.name} {job.fmt}: {job.path} ({state})")
    print(f"disk: {needed / 1e9:.1f} GB to write, {free / 1e9:.1f} GB free under {sizes_root()}", flush=True)
    if needed > free * 0.95:
        print("not enough free disk: build fewer sizes or formats (--sizes, --formats)", file=sys.stderr)
        return 1
    if args.dry_run:
        return 0
    for job in jobs:
        started = time.monotonic()
        print(f"building {job.shape.name} {job.fmt} ({job.disk_bytes / 1e9:.1f} GB)", flush=True)
        build(job, progress=lambda line: print(line, end="\r", flush=True))
        print(f"\n{job.path} in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
