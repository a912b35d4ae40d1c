"""What a GGUF file says about the work it runs, read from the file itself (the ``gguf`` package).

A "Q4_1" GGUF is not all Q4_1: llama.cpp's quantiser keeps norms in F32 and often the token
embedding at Q8_0 or Q6_K.  So the bytes a decode step reads are summed tensor by tensor, each
at its own type, rather than guessed from the file's type name: the roofline of a quantized
row (loadtest/measure/roofline_column.py) is the roofline of the bytes that really run.  The context
is the one llama.cpp reads from the same file, which the llama-server baseline serves as our
llama-cpp engine does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class GGUFWeights:
    path: Path
    total_bytes: int
    streamed_bytes: int  # read in full by one decode step: all but an untied input embedding
    bytes_by_type: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        parts = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in self.bytes_by_type.items())
        return f"{self.streamed_bytes / 1e6:.1f} MB read per decode step ({parts})"


def _reader(path: str | Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise RuntimeError("reading a GGUF file needs the gguf package: `pip install gguf` (make venv does)") from None
    return GGUFReader(Path(path))


def read_weights(path: str | Path) -> GGUFWeights:
    """The file's tensors' stored bytes.  With an ``output.weight`` the embedding is untied and a
    decode step only gathers its batch's rows of ``token_embd.weight``; tied, it is the output
    matrix and read whole."""
    tensors = _reader(path).tensors
    sizes = {t.name: int(t.n_bytes) for t in tensors}
    by_type: dict[str, int] = {}
    for tensor in tensors:
        by_type[tensor.tensor_type.name] = by_type.get(tensor.tensor_type.name, 0) + int(tensor.n_bytes)
    by_type = dict(sorted(by_type.items(), key=lambda item: -item[1]))  # the largest share first
    total = sum(sizes.values())
    untied_embedding = sizes.get("token_embd.weight", 0) if "output.weight" in sizes else 0
    return GGUFWeights(Path(path), total, total - untied_embedding, by_type)


def context_length(path: str | Path) -> int | None:
    """``<architecture>.context_length`` as the file states it, or None where it states none."""
    fields = _reader(path).fields
    arch_field = fields.get("general.architecture")
    if arch_field is None:
        return None
    architecture = bytes(arch_field.parts[arch_field.data[0]]).decode()
    length = fields.get(f"{architecture}.context_length")
    return int(length.parts[length.data[0]][0]) if length is not None else None
