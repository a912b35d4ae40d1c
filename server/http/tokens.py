"""vLLM's tokenizer routes, with its bodies: ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``.

lm-evaluation-harness's ``tokenizer_backend=remote`` speaks these, so a client needs no copy of
the model's tokenizer.  The engine's own tokenizer answers, so the ids are the ones it serves.
"""

from __future__ import annotations

from typing import Any

from server.http.api import FieldError, check_model, conversation, typed

TOKENIZE_FIELDS = frozenset(
    {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs"}
)
DETOKENIZE_FIELDS = frozenset({"model", "tokens"})


def tokenize(body: dict, served_model: str, tokenizer, max_context: int) -> dict:
    _only(body, TOKENIZE_FIELDS)
    check_model(body.get("model"), served_model)
    strings = typed(body, "return_token_strs", bool, False)
    if "messages" in body:
        chat = conversation(body)
        rendered = tokenizer.apply_chat_template(
            [{"role": role, "content": text} for role, text in chat.messages],
            tokenize=False,
            add_generation_prompt=typed(body, "add_generation_prompt", bool, True),
        )
        ids = tokenizer(rendered, add_special_tokens=False).input_ids
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise FieldError("prompt", "prompt is required and must be a string (or send messages)")
        ids = tokenizer(prompt, add_special_tokens=typed(body, "add_special_tokens", bool, True)).input_ids
    return {
        "count": len(ids),
        "max_model_len": max_context,
        "tokens": ids,
        "token_strs": tokenizer.convert_ids_to_tokens(ids) if strings else None,
    }


def detokenize(body: dict, served_model: str, tokenizer, vocab_size: int) -> dict:
    _only(body, DETOKENIZE_FIELDS)
    check_model(body.get("model"), served_model)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise FieldError("tokens", "tokens is required: a list of token ids")
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


def _only(body: dict, allowed: frozenset[str]) -> None:
    for name in body:
        if name not in allowed:
            raise FieldError(name, f"unsupported field {name!r}; this route takes {', '.join(sorted(allowed))}")
