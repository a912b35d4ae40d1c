"""The log's sizes: the GGUF and safetensors layouts hold exactly the shape's parameters, and the
vocabulary is padded or cut without a merge that makes a token it lost."""

from __future__ import annotations

import numpy as np
import pytest

from bench.roofline import load_shape
from bench.sizes.build import BLOCK_BYTES, Tensor, default_jobs, gguf_bytes, gguf_tensors, random_blocks
from bench.sizes.vocabulary import Vocabulary, pad_token, resized


@pytest.mark.parametrize("size", ["1.6b", "7b", "13b", "30b"])
def test_gguf_tensors_hold_the_shapes_parameters(size):
    shape = load_shape(size)
    count = sum(int(np.prod(t.shape)) for t in gguf_tensors(shape))
    assert count == shape.params


def test_quantised_bytes_follow_the_block_layout():
    shape = load_shape("7b")
    matrices = sum(int(np.prod(t.shape)) for t in gguf_tensors(shape) if t.kind == "matrix")
    plain = sum(int(np.prod(t.shape)) for t in gguf_tensors(shape) if t.kind != "matrix")
    assert gguf_bytes(shape, "Q4_0") == matrices // 32 * BLOCK_BYTES["Q4_0"] + plain * 4
    assert gguf_bytes(shape, "Q8_0") == matrices // 32 * BLOCK_BYTES["Q8_0"] + plain * 4


def test_random_blocks_carry_a_valid_scale():
    blocks = random_blocks(np.random.default_rng(0), Tensor("w", (4, 64), "matrix"), "Q8_0")
    assert blocks.shape == (4, 2 * BLOCK_BYTES["Q8_0"])
    scales = blocks.reshape(4, 2, BLOCK_BYTES["Q8_0"])[:, :, :2].copy().view(np.float16)
    assert np.all(np.isfinite(scales)) and np.all(scales > 0)


def _vocabulary() -> Vocabulary:
    tokens = ["a", "b", "c", "ab", "abc", "<eos>", "bc"]
    merges = ["a b", "ab c", "b c"]
    return Vocabulary(tokens, [1] * len(tokens), merges, "smollm", bos=5, eos=5)


def test_padding_adds_named_tokens():
    padded = resized(_vocabulary(), 10)
    assert padded.size == 10
    assert padded.tokens[7:] == [pad_token(7), pad_token(8), pad_token(9)]
    assert padded.merges == _vocabulary().merges


def test_cutting_drops_the_merges_that_make_a_lost_token():
    cut = resized(_vocabulary(), 6)
    assert cut.tokens == ["a", "b", "c", "ab", "abc", "<eos>"]
    assert cut.merges == ["a b", "ab c"]  # "b c" makes "bc", which was cut
    with pytest.raises(ValueError, match="BOS/EOS"):
        resized(_vocabulary(), 4)


def test_default_plan_puts_the_4_bit_files_first_and_keeps_the_disk_reserve(tmp_path, monkeypatch):
    monkeypatch.setenv("YAYI_SIZES_ROOT", str(tmp_path))
    shapes = [load_shape(s) for s in ("1.6b", "7b", "13b", "30b")]
    q4 = sum(gguf_bytes(s, "Q4_0") for s in shapes)
    jobs = default_jobs(shapes, memory=24 * 2**30, free=q4 + 10**9, reserve=10**9)
    assert {(j.shape.name, j.fmt) for j in jobs} == {(s.name, "Q4_0") for s in shapes}
    roomy = default_jobs(shapes, memory=24 * 2**30, free=10**15, reserve=10**9)
    # bfloat16 only where it fits in memory: not the 13B (26 GB) nor the 30B
    assert {j.shape.name for j in roomy if j.fmt == "bf16"} == {"1.6b", "7b"}
