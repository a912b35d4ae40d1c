"""The prompts load tests send: the inference log's speed prompts (docs/design.md) unless a file says otherwise."""

from __future__ import annotations

from pathlib import Path

# Verbatim from the inference log (docs/design.md, "The speed prompts").  The one copy: the load
# tests, bench/, scripts/gpu_check.py and the tests all read it from here, so every figure is
# measured on the same three.
LOG_SPEED_PROMPTS = (
    "Hey, are you conscious? Can you talk to me?",
    "I feel so bad today, what should I do?",
    "I've won an award today, I'm in a good mood",
)


def load_prompts(path: str | Path | None) -> tuple[str, ...]:
    """One prompt per non-empty line; a line may hold a JSON string when the prompt needs newlines."""
    if not path:
        return LOG_SPEED_PROMPTS
    import json

    prompts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.startswith('"'):
            try:
                line = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}:{number}: a line starting with a quote must be a JSON string ({exc})"
                ) from None
        prompts.append(line)
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line expected)")
    return tuple(prompts)
