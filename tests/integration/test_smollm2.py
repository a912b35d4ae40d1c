"""The embedded real model, SmolLM2-135M-Instruct, served end to end: quality, not just plumbing."""

from __future__ import annotations

import re

import grpc
import pytest

from loadtest.measure.prompts import LOG_SPEED_PROMPTS as LOG_PROMPTS
from server.grpc.wire import pb

# The real SmolLM2 served and asked for whole sentences: about 45 s on 2 cores.
pytestmark = pytest.mark.slow

# Words any coherent English reply to the inference log's prompts (docs/design.md) is bound to use;
# random weights never do.
COMMON_WORDS = {
    "i",
    "you",
    "the",
    "to",
    "a",
    "and",
    "is",
    "it",
    "of",
    "that",
    "in",
    "are",
    "be",
    "can",
    "for",
    "your",
    "my",
    "me",
    "with",
    "this",
    "have",
    "what",
    "so",
    "not",
    "do",
    "am",
    "on",
    "how",
    "feel",
}


def english_score(text: str) -> tuple[float, int]:
    words = re.findall(r"[^\s]+", text)
    ascii_words = [w for w in words if re.fullmatch(r"[A-Za-z'’,.!?;:\"()-]+", w)]
    common = {w.lower().strip(',.!?;:"()') for w in words} & COMMON_WORDS
    return len(ascii_words) / max(1, len(words)), len(common)


@pytest.mark.parametrize("prompt", LOG_PROMPTS)
def test_coherent_english_for_the_log_prompts(smol_server, prompt):
    response = smol_server.generate(prompt, max_new_tokens=48, timeout=300)
    ascii_share, common = english_score(response.text)
    assert len(response.text.split()) >= 8, response.text
    assert ascii_share > 0.9 and common >= 4, f"not coherent English: {response.text!r}"


@pytest.mark.parametrize("prompt", LOG_PROMPTS)
def test_chat_template_replies_in_english(smol_server, prompt):
    # Greedy chat on the award prompt loops on one emoji (a 135M model's habit, not a server
    # fault); a mild repetition penalty, as chat front-ends use, gives prose for all three.
    response = smol_server.generate(
        prompt, use_chat_template=True, max_new_tokens=48, repetition_penalty=1.2, timeout=300
    )
    ascii_share, common = english_score(response.text)
    assert ascii_share > 0.75 and common >= 4, f"not coherent English: {response.text!r}"


def test_english_scores_better_than_shuffled_words(smol_server):
    text = "The weather was lovely today, so we walked to the park and had a picnic by the lake."
    shuffled = "lake the picnic lovely park weather by walked we today, had and a so to The was the."
    real = smol_server.stub.Score(pb.ScoreRequest(text=text), timeout=120)
    scrambled = smol_server.stub.Score(pb.ScoreRequest(text=shuffled), timeout=120)
    assert real.perplexity * 5 < scrambled.perplexity, (real.perplexity, scrambled.perplexity)


def test_chinese_and_emoji_stream_as_whole_characters(smol_server):
    prompt = "请用中文回答：今天天气怎么样？🌞"
    chunks = list(smol_server.stream(prompt, max_new_tokens=40, ignore_eos=True, timeout=300))
    for chunk in chunks:
        chunk.text.encode("utf-8")
        assert "\ufffd" not in chunk.text
    unary = smol_server.generate(prompt, max_new_tokens=40, ignore_eos=True, timeout=300)
    assert "".join(c.text for c in chunks) == unary.text
    # SmolLM2's vocabulary splits most CJK characters into byte tokens: some chunks must have
    # carried several tokens, i.e. text was held back until a character was whole.
    assert any(len(c.token_ids) > 1 for c in chunks)


def test_stop_string_on_real_text(smol_server):
    free = smol_server.generate(LOG_PROMPTS[2], max_new_tokens=40, timeout=300).text
    word = next(w for w in free.split()[2:] if w.isalpha() and len(w) > 2)
    stopped = smol_server.generate(LOG_PROMPTS[2], max_new_tokens=40, stop=[word], timeout=300)
    assert stopped.finish_reason == "stop" and word not in stopped.text
    assert free.startswith(stopped.text)


def test_model_info_of_the_default_model(smol_server):
    info = smol_server.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=5)
    assert info.model == "smollm2-135m" and info.max_context == 8192 and info.vocab_size == 49152


def test_chat_prompt_is_checked_against_the_context(smol_server):
    with pytest.raises(grpc.RpcError) as error:
        smol_server.generate("x" * 10, use_chat_template=True, max_new_tokens=9000)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
