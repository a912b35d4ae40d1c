"""Streaming text stays valid UTF-8 with the real SmolLM2 tokenizer (tiny-llama's): a character split
across tokens is held back until whole, never sent as a replacement character."""

import pytest

from engines.text import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from engines.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("tiny-llama"))


@pytest.mark.parametrize(
    "text",
    [
        "你好，世界！今天天气很好。",
        "Party time 🎉🎉 with family 👨‍👩‍👧 and ✨sparkles✨",
        "Mixed: English, 中文, Ελληνικά, العربية, and emoji 🚀.",
        "  leading spaces and\nnew lines\n\n",
    ],
)
def test_chunks_are_whole_characters_and_join_to_the_text(tokenizer, text):
    ids = tokenizer(text).input_ids
    multi_token_chars = any(len(tokenizer.decode([i])) and "\ufffd" in tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(lambda t: tokenizer.decode(t, skip_special_tokens=True))
    chunks = [detok.push(i) for i in ids] + [detok.flush()]
    for chunk in chunks:
        assert "\ufffd" not in chunk
        chunk.encode("utf-8")  # raises on a lone surrogate
    assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=True) == text
    if any("\u4e00" <= ch <= "\u9fff" or ord(ch) > 0xFFFF for ch in text):
        assert multi_token_chars, "the case must split a character across tokens to test anything"


def test_character_unfinished_at_the_end_is_dropped_not_sent_as_replacement(tokenizer):
    ids = tokenizer("ok 你").input_ids
    assert "\ufffd" in tokenizer.decode(ids[-1:]), "the last character must span several tokens"
    detok = IncrementalDetokenizer(lambda t: tokenizer.decode(t, skip_special_tokens=True))
    sent = "".join(detok.push(i) for i in ids[:-1]) + detok.flush()
    assert sent == "ok "
