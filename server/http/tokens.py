"""vLLM's tokenizer routes, with its bodies: ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``.

lm-evaluation-harness's ``tokenizer_backend=remote`` speaks these, so a client needs no copy of
the model's tokenizer.  The engine's own tokenizer answers, so the ids are the ones it serves.
"""

from __future__ import annotations

from typing import Any

from server.http.protocol import DetokenizeRequest, FieldError, TokenizeRequest


def tokenize(body: dict, served_model: str, tokenizer, max_context: int) -> dict:
    request = TokenizeRequest.parse(body, served_model)
    if request.messages is not None:
        rendered = tokenizer.apply_chat_template(
            [{"role": role, "content": text} for role, text in request.messages.messages],
            tokenize=False,
            add_generation_prompt=request.add_generation_prompt,
        )
        ids = tokenizer(rendered, add_special_tokens=False).input_ids
    else:
        ids = tokenizer(request.prompt, add_special_tokens=request.add_special_tokens).input_ids
    return {
        "count": len(ids),
        "max_model_len": max_context,
        "tokens": ids,
        "token_strs": tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None,
    }


def detokenize(body: dict, served_model: str, tokenizer, vocab_size: int) -> dict:
    tokens = DetokenizeRequest.parse(body, served_model).tokens
    for index, token in enumerate(tokens):
        if not 0 <= token < vocab_size:
            raise FieldError(
                f"tokens[{index}]", f"tokens[{index}]={token} is outside the vocabulary (0..{vocab_size - 1})"
            )
    return {"prompt": tokenizer.decode(tokens)}


def tokenizer_info(tokenizer) -> dict:
    """The tokenizer's configuration as vLLM gives it: its init arguments, less file paths."""
    config: dict[str, Any] = {}
    for key, value in (getattr(tokenizer, "init_kwargs", None) or {}).items():
        if key in ("vocab_file", "merges_file", "tokenizer_file", "name_or_path"):
            continue
        config[key] = _plain(value)
    config["tokenizer_class"] = type(tokenizer).__name__
    template = getattr(tokenizer, "chat_template", None)
    if template:
        config["chat_template"] = template
    for name in ("eos_token", "bos_token", "pad_token"):
        token = getattr(tokenizer, name, None)
        if token is not None:
            config[name] = str(token)
    return config


def _plain(value: Any) -> Any:
    """JSON-ready: special-token objects become their text."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
