"""Regenerate the protobuf and gRPC modules from protos/ (``make protos``).

protoc writes absolute imports (``from yayi.serving.v1 import ...``) that only resolve
if the output folder is on sys.path; rewriting them as relative imports lets the
generated code live inside the ``server`` package.  The drift test calls
``generate()`` into a temporary folder and compares it with what is committed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_FILES = ["yayi/serving/v1/inference.proto"]
DEFAULT_OUT = ROOT / "server" / "generated"

_ABSOLUTE_IMPORT = re.compile(r"^from yayi\.serving\.v1 import (\w+)", re.MULTILINE)


def generate(out_dir: Path = DEFAULT_OUT) -> list[Path]:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(PROTO_ROOT / name) for name in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    written = []
    for path in sorted(out_dir.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi") or path.name == "__init__.py":
            continue
        text = path.read_text()
        path.write_text(_ABSOLUTE_IMPORT.sub(r"from . import \1", text))
        written.append(path)
    # Every folder on the way down must be a package for the relative imports to resolve.
    for folder in [out_dir, *[p for p in out_dir.rglob("*") if p.is_dir() and p.name != "__pycache__"]]:
        (folder / "__init__.py").touch()
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(target):
        print(path.relative_to(target))
