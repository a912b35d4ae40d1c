"""Log-probabilities, token-id prompts and scoring without generating, on every engine, in process.

Each engine's values are checked against transformers' own forward pass on the same
weights (float32): the log-softmax of the raw logits, within 1e-3, with the same top ids.
tiny-llama for speed; SmolLM2 once.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from engines import EngineConfig, SamplingParams, create_engine
from engines.errors import InvalidRequest
from engines.hf.engine import KVCacheEngine
from engines.models import resolve_model
from tests.helpers.engine_calls import collect, started_engines, token_ids
from tests.helpers.marks import engine_param

HF_ENGINES = ["hf-eager", "hf-kv", "hf-flash", "hf-cb"]
ENGINES = [*HF_ENGINES, engine_param("vllm")]
TOLERANCE = 1e-3
PROMPT = "The quick brown fox jumps over the lazy dog, and then"
# Multi-byte characters split across byte-level tokens: their texts must still join up.
UNICODE_PROMPT = "Hello 世界, café 🌍 done"
# A random model left alone repeats one token; the penalty makes each step depend on the logits,
# and, since the values are of the raw logits, it must not change them.
GREEDY = dict(max_new_tokens=8, repetition_penalty=3.0, ignore_eos=True)
SAMPLED = dict(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=7, ignore_eos=True)


@pytest.fixture(scope="module")
def started(loop):
    yield from started_engines(loop)


@pytest.fixture(scope="module")
def vllm_engine(loop):
    pytest.importorskip("vllm", reason="vllm is installed by `make venv`; this skip only shows where it is not")
    from engines.vllm.engine import VLLMOptions

    engines = {}

    def get(model: str = "tiny-llama"):
        if model not in engines:
            engine = create_engine("vllm", EngineConfig(model=model, options=VLLMOptions(enforce_eager=True)))
            loop.run(engine.start(), timeout=600)
            engines[model] = engine
        return engines[model]

    yield get
    for engine in engines.values():
        loop.run(engine.shutdown())


@pytest.fixture(scope="module")
def engine_for(started, vllm_engine):
    return lambda name, model="tiny-llama": vllm_engine(model) if name == "vllm" else started(name, model)


@pytest.fixture(scope="module")
def reference():
    """transformers' own forward, eager attention: row i holds the log-probabilities of the token after ids[: i + 1]."""
    from transformers import AutoModelForCausalLM

    models = {}

    def logprobs(ids, model: str = "tiny-llama") -> torch.Tensor:
        if model not in models:
            models[model] = AutoModelForCausalLM.from_pretrained(
                resolve_model(model), dtype=torch.float32, attn_implementation="eager"
            ).eval()
        with torch.inference_mode():
            logits = models[model](input_ids=torch.tensor([list(ids)])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    return logprobs


def assert_entries_match(entries, ids, start: int, rows: torch.Tensor, k: int) -> None:
    """``entries[j]`` is for ``ids[start + j]``, predicted by ``rows[start + j - 1]``."""
    assert len(entries) == len(ids) - start
    for offset, entry in enumerate(entries):
        position = start + offset
        row = rows[position - 1]
        assert entry.token_id == ids[position]
        assert entry.logprob == pytest.approx(float(row[ids[position]]), abs=TOLERANCE), position
        expected = torch.topk(row, k)
        assert [alt.token_id for alt in entry.top] == expected.indices.tolist(), position
        for alt, value in zip(entry.top, expected.values.tolist(), strict=True):
            assert alt.logprob == pytest.approx(value, abs=TOLERANCE)
        assert all(a.logprob >= b.logprob for a, b in zip(entry.top, entry.top[1:]))


def prompt_ids(engine, text: str) -> list[int]:
    return engine.tokenizer(text).input_ids


def logprobs_of(outputs):
    return [entry for out in outputs for entry in out.logprobs]


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("name", ENGINES)
def test_logprobs_equal_transformers_forward(loop, engine_for, reference, name, sampling):
    engine = engine_for(name)
    params = SamplingParams(logprobs=5, prompt_logprobs=3, **sampling)
    outputs = loop.run(collect(engine, PROMPT, params))
    prompt = prompt_ids(engine, PROMPT)
    generated = token_ids(outputs)
    assert len(generated) == 8 and len(set(generated)) > 1
    sequence = prompt + generated
    rows = reference(sequence)
    # The prompt's come once, on the first output, the first token with none.
    first = outputs[0].prompt_logprobs
    assert first is not None and first[0] is None and all(o.prompt_logprobs is None for o in outputs[1:])
    assert_entries_match(first[1:], prompt, 1, rows, 3)
    assert all(len(o.logprobs) == len(o.token_ids) for o in outputs)
    assert_entries_match(logprobs_of(outputs), sequence, len(prompt), rows, 5)


@pytest.mark.parametrize("name", ENGINES)
def test_nothing_asked_nothing_returned(loop, engine_for, name):
    outputs = loop.run(collect(engine_for(name), PROMPT, SamplingParams(max_new_tokens=3)))
    assert all(o.logprobs == () and o.prompt_logprobs is None for o in outputs)


@pytest.mark.parametrize("name", ENGINES)
def test_prompt_logprobs_sum_to_the_score(loop, engine_for, name):
    engine = engine_for(name)
    outputs = loop.run(collect(engine, PROMPT, SamplingParams(max_new_tokens=0, prompt_logprobs=0)))
    score = loop.run(engine.score(PROMPT))
    entries = outputs[0].prompt_logprobs
    assert len(entries) - 1 == score.token_count
    assert sum(e.logprob for e in entries[1:]) == pytest.approx(score.total_logprob, abs=TOLERANCE)


@pytest.mark.parametrize("name", ENGINES)
def test_scoring_only_returns_one_output(loop, engine_for, reference, name):
    engine = engine_for(name)
    ids = prompt_ids(engine, PROMPT)
    outputs = loop.run(collect(engine, ids, SamplingParams(max_new_tokens=0, prompt_logprobs=2)))
    assert len(outputs) == 1
    (out,) = outputs
    assert (out.token_ids, out.text, out.completion_tokens, out.finish_reason) == ((), "", 0, "length")
    assert out.prompt_tokens == len(ids) and out.started_at is not None
    assert out.prompt_logprobs[0] is None
    assert_entries_match(out.prompt_logprobs[1:], ids, 1, reference(ids), 2)
    assert engine.load().running == 0


@pytest.mark.parametrize("name", ENGINES)
def test_one_new_token_with_the_prompts_logprobs(loop, engine_for, reference, name):
    """lm-eval's scoring request (echo, max_tokens 1): hf-cb serves it from one forward of its scorer."""
    engine = engine_for(name)
    ids = prompt_ids(engine, PROMPT)
    params = SamplingParams(max_new_tokens=1, logprobs=2, prompt_logprobs=2, ignore_eos=True)
    outputs = loop.run(collect(engine, ids, params))
    rows = reference(ids)
    assert [len(o.token_ids) for o in outputs] == [1] and outputs[-1].finish_reason == "length"
    (token,) = outputs[0].token_ids
    assert token == int(rows[-1].argmax()) and outputs[0].completion_tokens == 1
    assert outputs[0].prompt_logprobs[0] is None
    assert_entries_match(outputs[0].prompt_logprobs[1:], ids, 1, rows, 2)
    assert_entries_match(logprobs_of(outputs), [*ids, token], len(ids), reference([*ids, token]), 2)
    assert engine.load().running == 0


@pytest.mark.parametrize("name", ENGINES)
def test_token_id_prompt_generates_as_the_text(loop, engine_for, name):
    engine = engine_for(name)
    params = SamplingParams(**GREEDY)
    from_text = loop.run(collect(engine, PROMPT, params))
    from_ids = loop.run(collect(engine, tuple(prompt_ids(engine, PROMPT)), params))
    assert token_ids(from_ids) == token_ids(from_text)
    assert "".join(o.text for o in from_ids) == "".join(o.text for o in from_text)
    assert from_ids[-1].prompt_tokens == from_text[-1].prompt_tokens


def test_token_texts_join_to_the_text(loop, engine_for):
    engine = engine_for("hf-kv")
    tokenizer = engine.tokenizer
    ids = prompt_ids(engine, UNICODE_PROMPT)
    outputs = loop.run(collect(engine, UNICODE_PROMPT, SamplingParams(logprobs=2, prompt_logprobs=2, **GREEDY)))
    prompt_texts = [tokenizer.decode(ids[:1]), *(e.text for e in outputs[0].prompt_logprobs[1:])]
    assert "".join(prompt_texts) == UNICODE_PROMPT
    # A token that only starts a character has "" and the one that ends it the whole character.
    assert "" in prompt_texts and any(text.endswith("界") for text in prompt_texts)
    entries = logprobs_of(outputs)
    generated = [e.token_id for e in entries]
    assert "".join(e.text for e in entries) == tokenizer.decode(generated, skip_special_tokens=False).rstrip("\ufffd")
    for entry in entries:
        for alt in entry.top:
            expected = entry.text if alt.token_id == entry.token_id else tokenizer.decode([alt.token_id])
            assert alt.text == expected


def test_hf_cb_logprobs_in_a_shared_batch(loop, engine_for, reference):
    """Rows of one forward pass, some asking and some not: each request gets its own row's values."""
    engine = engine_for("hf-cb")
    prompts = [PROMPT, "Once upon a time", "In a galaxy far away, there", "Numbers: 1 2 3"]
    asks = [5, None, 0, 2]

    async def together():
        runs = [
            collect(engine, prompt, SamplingParams(logprobs=k, **GREEDY), f"b{i}")
            for i, (prompt, k) in enumerate(zip(prompts, asks, strict=True))
        ]
        return await asyncio.gather(*runs)

    for prompt, k, outputs in zip(prompts, asks, loop.run(together()), strict=True):
        if k is None:
            assert logprobs_of(outputs) == []
            continue
        sequence = prompt_ids(engine, prompt) + token_ids(outputs)
        assert_entries_match(logprobs_of(outputs), sequence, len(sequence) - 8, reference(sequence), k)


@pytest.mark.parametrize(
    "prompt, field",
    [((), "prompt"), ([], "prompt"), ([5, 49152], "prompt"), ([-1, 5], "prompt"), ([5, True], "prompt")],
    ids=["empty-tuple", "empty-list", "past-vocabulary", "negative", "bool"],
)
def test_bad_token_ids_name_the_prompt(loop, engine_for, prompt, field):
    engine = engine_for("hf-kv")
    with pytest.raises(InvalidRequest, match="prompt") as refused:
        loop.run(collect(engine, prompt, SamplingParams(max_new_tokens=2)))
    assert refused.value.field == field
    assert engine.load().running == 0


def test_token_ids_past_the_context_and_with_a_template_are_refused(loop, engine_for):
    engine = engine_for("hf-kv")
    with pytest.raises(InvalidRequest, match="context is 1024") as refused:
        loop.run(collect(engine, [5] * 1024, SamplingParams(max_new_tokens=1)))
    assert refused.value.field == "prompt"

    async def with_template():
        return [o async for o in engine.generate([5, 6], SamplingParams(max_new_tokens=1), "t", True)]

    with pytest.raises(InvalidRequest, match="chat template") as refused:
        loop.run(with_template())
    assert refused.value.field == "use_chat_template"


class _WithoutLogprobs(KVCacheEngine):
    name = "without-logprobs"
    offers_logprobs = False


def test_an_engine_that_cannot_refuses_by_name(loop):
    engine = _WithoutLogprobs(EngineConfig(model="tiny-llama"))
    loop.run(engine.start())
    try:
        for params, field in [
            (SamplingParams(logprobs=1), "logprobs"),
            (SamplingParams(max_new_tokens=0, prompt_logprobs=1), "prompt_logprobs"),
        ]:
            with pytest.raises(InvalidRequest, match="engine without-logprobs cannot") as refused:
                loop.run(collect(engine, PROMPT, params))
            assert refused.value.field == field
    finally:
        loop.run(engine.shutdown())


@pytest.mark.parametrize("name", ["hf-kv", "hf-cb", engine_param("vllm")])
def test_smollm2_logprobs_equal_transformers_and_the_score(loop, engine_for, reference, name):
    engine = engine_for(name, "smollm2-135m")
    text = "The capital of France is Paris. The capital of Italy is"
    params = SamplingParams(max_new_tokens=6, logprobs=5, prompt_logprobs=5)
    outputs = loop.run(collect(engine, text, params), timeout=300)
    prompt = prompt_ids(engine, text)
    sequence = prompt + token_ids(outputs)
    rows = reference(sequence, "smollm2-135m")
    assert_entries_match(outputs[0].prompt_logprobs[1:], prompt, 1, rows, 5)
    assert_entries_match(logprobs_of(outputs), sequence, len(prompt), rows, 5)
    score = loop.run(engine.score(text), timeout=300)
    assert sum(e.logprob for e in outputs[0].prompt_logprobs[1:]) == pytest.approx(score.total_logprob, abs=TOLERANCE)
    # A real model is sure of some tokens: the check is not only of near-uniform values.
    assert max(e.logprob for e in logprobs_of(outputs)) > -1.0
