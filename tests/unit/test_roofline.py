"""The roofline calculator against cases small enough to work out by hand."""

from __future__ import annotations

import math

import pytest

from bench import roofline as cli  # the command line and the shape files under bench/shapes
from loadtest.measure import roofline as rl  # the model

# A toy device and shape whose figures are easy to follow: 100 weights, all read each step.
DEVICE = rl.Device("toy", peak_flops=1000.0, bandwidth=100.0, memory_bytes=1e6, source="test")
SHAPE = rl.ModelShape(
    name="toy",
    params=100,
    layers=2,
    hidden=4,
    heads=1,
    kv_heads=1,
    vocab=1,
    intermediate=None,
    source="test",
    tie_embeddings=True,
)


def test_llama_parameter_count_by_hand():
    # head_dim 2: q 4x4, k and v 4x2 each, o 4x4 = 48; MLP 3x4x8 = 96; two norms 8;
    # untied embeddings 2x10x4 = 80; final norm 4.
    assert (
        rl.count_params(
            "llama", layers=1, hidden=4, heads=2, kv_heads=1, vocab=10, intermediate=8, tie_embeddings=False
        )
        == 48 + 96 + 8 + 80 + 4
    )


def test_bloom_parameter_count_by_hand():
    # fused qkv 4x12 + 12 bias, dense 4x4 + 4; MLP 4x16 + 16 and 16x4 + 4; two LayerNorms 16;
    # tied embedding 40; embedding and final LayerNorms 16.
    assert (
        rl.count_params(
            "bloom", layers=1, hidden=4, heads=2, kv_heads=2, vocab=10, intermediate=None, tie_embeddings=True
        )
        == 60 + 20 + 80 + 68 + 16 + 40 + 16
    )


@pytest.mark.parametrize("architecture", ["llama", "bloom"])
def test_count_matches_a_real_transformers_model(architecture):
    import torch
    from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig

    if architecture == "llama":
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=172,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=300,
            tie_word_embeddings=False,
        )
    else:
        config = BloomConfig(hidden_size=64, n_layer=3, n_head=4, vocab_size=300)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    # named_parameters() lists a tied weight once, as the count does.
    stored = sum(p.numel() for p in model.parameters())
    assert rl.shape_from_hf_config(config.to_dict()).params == stored


def test_shape_files_match_their_model_cards():
    shapes = {s.name: s for s in cli.builtin_shapes()}
    assert set(shapes) >= {"1.6b", "7b", "13b", "30b"}
    assert shapes["7b"].params == 7_069_016_064 and shapes["7b"].positions == "alibi"
    assert shapes["13b"].params == 13_015_864_320 and shapes["13b"].positions == "rope"
    # StableLM-2's biases are left out of the Llama-style count: 0.015 % short.
    assert shapes["1.6b"].params == pytest.approx(shapes["1.6b"].reported_params, rel=2e-4)
    assert 30.0e9 < shapes["30b"].params < 30.8e9
    assert all(s.source for s in shapes.values())


def test_decode_bound_is_bandwidth_over_bytes_until_compute_caps_it():
    # 100 weights x 2 bytes = 200 bytes a step; 100 B/s gives 0.5 steps/s.
    assert rl.decode_bound_tokens_per_s(SHAPE, DEVICE, batch=1) == pytest.approx(0.5)
    # A batch shares the weight read: 4 sequences, 4 tokens a step.
    assert rl.decode_bound_tokens_per_s(SHAPE, DEVICE, batch=4) == pytest.approx(2.0)
    # 200 FLOPs a token at 1000 FLOP/s caps every batch at 5 tokens/s.
    assert rl.decode_bound_tokens_per_s(SHAPE, DEVICE, batch=100) == pytest.approx(5.0)
    assert rl.bound_kind(SHAPE, DEVICE, batch=4) == "memory"
    assert rl.bound_kind(SHAPE, DEVICE, batch=100) == "compute"


def test_decode_bound_reads_the_kv_cache():
    # K and V, 2 layers, 1 KV head of dim 4, 2 bytes: 32 bytes a token; 10 tokens: 320 bytes.
    assert rl.kv_bytes_per_token(SHAPE) == 32
    assert rl.decode_step_bytes(SHAPE, batch=1, context=10) == 200 + 320
    # FLOPs: 200 + 4 x 2 layers x 10 x 4 = 520; the memory roof (100/520) is the lower.
    assert rl.decode_flops_per_token(SHAPE, context=10) == 520
    assert rl.decode_bound_tokens_per_s(SHAPE, DEVICE, batch=1, context=10) == pytest.approx(100 / 520)


def test_memory_is_weights_plus_cache():
    assert rl.memory_bytes(SHAPE, batch=3, context=10) == 200 + 3 * 10 * 32
    assert rl.memory_bytes(SHAPE, batch=1, context=0, bytes_per_param=4) == 400
    assert rl.memory_bytes(SHAPE, batch=1, context=10, bytes_per_param=4, kv_bytes_per_value=1) == 400 + 160


def test_prefill_bound_takes_the_slower_roof():
    # 10 tokens: 2x100x10 = 2000 matmul FLOPs + causal attention 2 x 2 layers x 10^2 x 4 = 1600.
    assert rl.prefill_flops(SHAPE, 10) == 3600
    # At 100 B/s moving 200 + 320 bytes takes 5.2 s, longer than 3.6 s of compute.
    assert rl.prefill_bound_tokens_per_s(SHAPE, DEVICE, batch=1, prompt=10) == pytest.approx(10 / 5.2)
    fast_memory = rl.Device("toy", peak_flops=1000.0, bandwidth=1000.0, memory_bytes=1e6, source="test")
    assert rl.prefill_bound_tokens_per_s(SHAPE, fast_memory, batch=1, prompt=10) == pytest.approx(10 / 3.6)


def test_untied_input_embedding_is_not_streamed():
    shape = rl.make_shape("untied", layers=1, hidden=4, heads=2, kv_heads=1, vocab=10, intermediate=8)
    assert shape.streamed_params == shape.params - 40


def test_log_row_against_the_a100_preset():
    seven = cli.load_shape("7b")
    bound = rl.decode_bound_tokens_per_s(seven, rl.DEVICES["a100-80g"], batch=1, context=0)
    assert bound == pytest.approx(2039e9 / (7_069_016_064 * 2))
    assert 0.2 < 30.76 / bound < 0.22
    # The inference log's (docs/design.md) 14814 MB is the bf16 weights (14.1 GB) plus a little.
    assert rl.memory_bytes(seven, 1, 0) / 2**20 == pytest.approx(13483, rel=1e-3)


def test_probe_this_machine_measures_something():
    device = rl.probe_this_machine(seconds=0.2, copy_mib=16, gemm_n=128)
    assert math.isfinite(device.peak_flops) and device.peak_flops > 1e8
    assert math.isfinite(device.bandwidth) and device.bandwidth > 1e8
    assert device.memory_bytes > 2**30 and "probe_this_machine" in device.source


def test_cli_prints_a_table(capsys):
    cli.main(["--models", "7b", "--devices", "a100-80g", "--context", "0"])
    out = capsys.readouterr().out
    assert "| 7b | 7.07 | A100-80G SXM |" in out and "144.2" in out
