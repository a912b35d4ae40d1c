"""llama-cpp's place in yayi-compare without a server: the roofline of a quantized row read from
its GGUF file's own tensors, llama-server set up from llama-cpp's flags, and its ratio table."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from engines.llama_cpp.gguf import BUILD_FLAGS_FILE
from loadtest.compare.driver import clock_pairs, http_twins, parse_args, target_config
from loadtest.compare.report import VERSUS, markdown_report, ratio_rows
from loadtest.compare.rounds import aggregate_all
from loadtest.compare.schedule import components
from loadtest.compare.targets import LlamaServerTarget, baseline_target, chosen_baselines, parse_baselines
from loadtest.measure.gguf_file import context_length, read_weights
from loadtest.measure.roofline import Device
from loadtest.measure.roofline_column import RooflineColumn

gguf = pytest.importorskip("gguf", reason="the gguf package comes with `make venv` (it reads SmolLM2's GGUF)")

HIDDEN, LAYERS, VOCAB, INTERMEDIATE = 64, 2, 96, 128
CONFIG = {
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "intermediate_size": INTERMEDIATE,
    "tie_word_embeddings": True,
    "max_position_embeddings": 512,
}
# Bytes of a block of 32 weights: Q4_1 keeps a fp16 scale and minimum and 32 nibbles, Q8_0 a fp16
# scale and 32 bytes (ggml's block_q4_1 and block_q8_0).
Q4_1_BLOCK, Q8_0_BLOCK = 2 + 2 + 16, 2 + 32


def write_gguf(path, untied: bool = False) -> int:
    """A llama-shaped GGUF as llama.cpp's quantiser writes a "Q4_1" file: the matrices Q4_1, the
    embedding Q8_0, the norms F32.  Returns the bytes a decode step reads, counted by hand."""
    Q = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(CONFIG["max_position_embeddings"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    rng = np.random.default_rng(0)
    streamed = 0

    def add(name, rows, cols, kind, streams=True):
        nonlocal streamed
        data = rng.standard_normal((rows, cols)).astype(np.float32)
        if kind == Q.F32:
            writer.add_tensor(name, data)
            size = rows * cols * 4
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
            size = rows * cols // 32 * (Q4_1_BLOCK if kind == Q.Q4_1 else Q8_0_BLOCK)
        streamed += size if streams else 0

    add("token_embd.weight", VOCAB, HIDDEN, Q.Q8_0, streams=not untied)
    for layer in range(LAYERS):
        add(f"blk.{layer}.attn_norm.weight", 1, HIDDEN, Q.F32)
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add(f"blk.{layer}.{part}.weight", HIDDEN, HIDDEN, Q.Q4_1)
        add(f"blk.{layer}.ffn_norm.weight", 1, HIDDEN, Q.F32)
        add(f"blk.{layer}.ffn_gate.weight", INTERMEDIATE, HIDDEN, Q.Q4_1)
        add(f"blk.{layer}.ffn_up.weight", INTERMEDIATE, HIDDEN, Q.Q4_1)
        add(f"blk.{layer}.ffn_down.weight", HIDDEN, INTERMEDIATE, Q.Q4_1)
    add("output_norm.weight", 1, HIDDEN, Q.F32)
    if untied:
        add("output.weight", VOCAB, HIDDEN, Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return streamed


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def test_a_gguf_is_read_tensor_by_tensor_at_each_ones_own_type(tmp_path):
    tied = write_gguf(tmp_path / "tied.gguf")
    weights = read_weights(tmp_path / "tied.gguf")
    assert weights.streamed_bytes == weights.total_bytes == tied
    assert list(weights.bytes_by_type) == ["Q4_1", "Q8_0", "F32"]  # the largest share first
    # Untied, a step gathers its rows of the input embedding and reads the output matrix whole.
    untied = write_gguf(tmp_path / "untied.gguf", untied=True)
    weights = read_weights(tmp_path / "untied.gguf")
    assert weights.streamed_bytes == untied == weights.total_bytes - VOCAB * HIDDEN // 32 * Q8_0_BLOCK
    assert context_length(tmp_path / "untied.gguf") == 512


def test_a_quantized_row_is_bound_by_its_own_smaller_weights(tmp_path, model):
    streamed = write_gguf(tmp_path / "m.Q4_1.gguf")
    column = RooflineColumn(str(model), context=40)
    # A machine whose FLOP/s never cap the bound: it is bandwidth over the bytes a step reads.
    device = Device("probe", peak_flops=1e30, bandwidth=1e9, memory_bytes=1e12, source="test")
    column.cpu_devices = {"float32": device, "bfloat16": device}
    kv_f16 = 2 * LAYERS * 2 * (HIDDEN // 2) * 2  # keys and values, every layer, 2 bytes each
    quantized = {"users": 4, "dtype": "Q4_1", "model_path": str(tmp_path / "m.Q4_1.gguf"), "speed_tokens_per_s": 50.0}
    bf16 = {"users": 4, "dtype": "bfloat16", "model_path": str(model), "speed_tokens_per_s": 50.0}
    column.fill(quantized)
    column.fill(bf16)
    assert quantized["bound_tokens_per_s"] == pytest.approx(1e9 * 4 / (streamed + 4 * 40 * kv_f16))
    assert bf16["bound_tokens_per_s"] == pytest.approx(1e9 * 4 / (2 * column.shape.params + 4 * 40 * kv_f16))
    # Under half of bf16's bytes: the same speed is a smaller share of the quantized row's bound.
    assert streamed < column.shape.params
    assert quantized["pct_of_bound"] < bf16["pct_of_bound"]
    assert any("m.Q4_1.gguf" in line and "Q4_1" in line for line in column.describe())
    # A quantized type named without its file has no bytes to be measured against: n/a, not bf16's.
    orphan = {"users": 4, "dtype": "Q4_1", "model_path": "", "speed_tokens_per_s": 50.0}
    column.fill(orphan)
    assert orphan["pct_of_bound"] is None


@pytest.fixture
def built(tmp_path, monkeypatch):
    """A stand-in llama-server where the engine looks for one: what is checked is the command line."""
    home = tmp_path / "llama.cpp"
    (home / "bin").mkdir(parents=True)
    binary = home / "bin" / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    (home / BUILD_FLAGS_FILE).write_text("-mno-amx-tile\n")
    monkeypatch.setenv("YAYI_LLAMA_CPP_HOME", str(home))
    return binary


def test_llama_server_is_started_as_the_engine_starts_its_child(tmp_path, built):
    path = tmp_path / "m.Q4_1.gguf"
    write_gguf(path)
    argv = ["--engines", "llama-cpp", "--model", str(path), "--server-args", "--threads 3 --max-concurrency 5"]
    config = replace(parse_args([*argv, "--llama-server-args", "--cache-type-k f16"]), model_path=str(tmp_path))
    target = baseline_target("llama-server", target_config(config), tmp_path)
    assert isinstance(target, LlamaServerTarget)
    command = target.command()
    assert command[0] == str(built) and command[command.index("--model") + 1] == str(path)
    flags = dict(zip(command[1::2], command[2::2]))
    # Five slots of the file's 512-token context, three threads, llama-cpp's batch size.
    assert flags["--threads"] == "3" and flags["--parallel"] == "5" and flags["--ctx-size"] == str(5 * 512)
    assert flags["--batch-size"] == "2048" and flags["--alias"] == str(path)
    # Repacking is left on, as the engine leaves it (llama-server's own default).
    assert {"--no-kv-unified", "--metrics"} <= set(command) and "--no-repack" not in command
    assert command[-2:] == ["--cache-type-k", "f16"]
    # The row says what runs: the file's own type, and the file, for its roofline.
    assert (target.dtype, target.model_path) == ("Q4_1", str(path))
    # As its users start it: the same file and llama-server's own settings for everything else.
    defaults = baseline_target("llama-server-defaults", target_config(config), tmp_path).command()
    assert defaults[defaults.index("--model") + 1] == str(path) and defaults[-2:] == ["--cache-type-k", "f16"]
    assert not {"--threads", "--parallel", "--ctx-size", "--batch-size", "--no-kv-unified"} & set(defaults)
    # A flag llama-cpp refuses is the baseline's failure, said in the server's own words.
    config = replace(parse_args([*argv[:4], "--server-args", "--kv-cache-gb 2"]), model_path=str(tmp_path))
    with pytest.raises(RuntimeError, match="--kv-cache-gb is not an option of engine llama-cpp"):
        baseline_target("llama-server", target_config(config), tmp_path).command()


def test_llama_server_goes_with_llama_cpp(built):
    assert chosen_baselines("auto", ["hf-kv", "llama-cpp"]) == ["llama-server", "llama-server-defaults"]
    assert parse_baselines("llama-server") == ["llama-server"]
    built.unlink()  # not built: auto leaves it out, as it leaves vLLM's server out where vllm is missing
    assert chosen_baselines("auto", ["llama-cpp"]) == []


def round_row(engine, users, number, seq, speed):
    return {"model": "m", "engine": engine, "users": users, "round": number, "seq": seq, "clock": "locust"} | {
        "speed_tokens_per_s": speed,
        "ttft_p50_ms": 5.0,
        "raw": f"raw/{engine}_u{users}_r{number}",
    }


def test_the_llama_cpp_rows_are_paired_with_llama_server_alone():
    # llama-cpp and llama-server interleaved over two rounds, beside a vllm-openai row at the same step.
    rounds = [
        round_row("llama-cpp", 4, 1, 1, 90.0),
        round_row("llama-server", 4, 1, 2, 100.0),
        round_row("vllm-openai", 4, 1, 3, 50.0),
        round_row("llama-cpp", 4, 2, 4, 96.0),
        round_row("llama-server", 4, 2, 5, 100.0),
        round_row("vllm-openai", 4, 2, 6, 50.0),
    ]
    rows = list(aggregate_all(rounds).values())
    table = ratio_rows(rows, rounds, [], "llama-cpp", "llama-server")
    assert len(table) == 1 and table[0]["ratio (median)"] == "0.93" and table[0]["ratio min–max"] == "0.90–0.96"
    assert table[0]["reads as"] == "llama-server faster"
    assert table[0]["tokens/s llama-cpp"] == "93.0" and table[0]["tokens/s llama-server"] == "100.0"
    context = {"model": "m", "command": "c", "started": "s", "finished": "f", "machine": "here", "repeat": 2}
    text = markdown_report(rows, {**context, "column_notes": []}, [], rounds, [])
    titles = [line for line in text.splitlines() if line.startswith("## ") and "against" in line]
    assert titles == ["## Our llama-cpp engine against llama.cpp's own llama-server (the same GGUF, threads and slots)"]
    # The pair is up together and gets the second clock, as every engine and its outside peer do.
    labels = [SimpleNamespace(label=name) for name in ("hf-kv", "llama-cpp", "llama-server")]
    assert components(labels, VERSUS) == [[0], [1, 2]]
    peer = object.__new__(LlamaServerTarget)
    assert clock_pairs([SimpleNamespace(label="llama-cpp"), peer]) == [("llama-cpp", "llama-server")]


def test_our_http_row_is_also_set_against_the_outside_server():
    """With --apis grpc,http, ours through HTTP meets the outside server over the same wire and client;
    an HTTP row with no outside peer (hf-kv-http) and an outside server not in the run get no table."""
    peer = object.__new__(LlamaServerTarget)
    peer.label = "llama-server"
    targets = [SimpleNamespace(label=name) for name in ("llama-cpp", "llama-cpp-http", "hf-kv", "hf-kv-http")]
    twins = http_twins(VERSUS, [*targets, peer])
    assert [(ours, theirs) for ours, theirs, _ in twins] == [("llama-cpp-http", "llama-server")]
    assert twins[0][2].endswith("both through HTTP (streamed `/v1/completions`)")
    assert http_twins(VERSUS, targets) == []
