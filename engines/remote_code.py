"""Whether a model folder runs Python code of its own, and the refusal when that was not allowed.

A folder names its own classes through ``auto_map`` in config.json (configuration, model) or
tokenizer_config.json (tokenizer): loading it imports the Python files beside the weights, which
can do anything the server's user can.  Such code runs only with ``--trust-remote-code``; without
it the folder is refused here, before anything loads, in one line that names the files.
"""

from __future__ import annotations

import json
from pathlib import Path

from engines.errors import ModelRefused

FLAG = "--trust-remote-code"
_MAPS = ("config.json", "tokenizer_config.json")


def custom_code_files(model: str) -> tuple[str, ...]:
    """The Python files the folder's ``auto_map`` entries name, in file order; () for a built-in name or a GGUF."""
    folder = Path(model).expanduser()
    files: list[str] = []
    for name in _MAPS:
        try:
            settings = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue  # no such file (a built-in name, a .gguf): nothing of its own to run
        for reference in _references(settings.get("auto_map") if isinstance(settings, dict) else None):
            # "module.Class", or "repo--module.Class" for code kept in another hub repository.
            module = reference.split("--")[-1].rsplit(".", 1)[0]
            file = module.replace(".", "/") + ".py"
            if file not in files:
                files.append(file)
    return tuple(files)


def _references(auto_map) -> list[str]:
    if not isinstance(auto_map, dict):
        return []
    found: list[str] = []
    for value in auto_map.values():
        # A tokenizer's entry is [slow class, fast class], either of which may be null.
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and item:
                found.append(item)
    return found


def checked(model: str, trusted: bool) -> tuple[str, ...]:
    """The files that will run (empty when none); refuses a folder with code of its own unless ``trusted``."""
    files = custom_code_files(model)
    if files and not trusted:
        raise ModelRefused(
            f"refusing to run the model's own code ({', '.join(files)}) from {model}: pass {FLAG} if you trust it"
        )
    return files
