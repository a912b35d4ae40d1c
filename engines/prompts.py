"""Prompt text to token ids, the same way for every engine, so usage counts agree across engines."""

from __future__ import annotations

from .errors import InvalidRequest


def encode_prompt(tokenizer, prompt: str, use_chat_template: bool, model_name: str) -> list[int]:
    if not use_chat_template:
        return tokenizer(prompt).input_ids
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest(f"model {model_name!r} has no chat template; send use_chat_template=false")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids
