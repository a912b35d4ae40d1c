"""The code's shape holds: imports run one way, and the engine seam is called only where it is public.

Both checks read the source with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("server", "engines", "loadtest", "bench")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the packages checked, by dotted name."""
    return {
        module_name(path, root): path
        for package in PACKAGES
        for path in sorted((root / package).rglob("*.py"))
        if "generated" not in path.parts  # protoc's output imports only itself and protobuf
    }


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours that ``module`` imports anywhere in its file (at load or inside a function)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from pkg import module` imports the module; `from pkg import name`, pkg itself.
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name in known and name != module}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = our_modules(root)
    return {name: imported(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as the modules along it (the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" once every way out is seen
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle(tmp_path):
    """The check itself can fail: two modules that import each other, one of them inside a function."""
    package = tmp_path / "engines"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from engines import b\n")
    (package / "b.py").write_text("def late():\n    from .a import x\n")
    assert find_cycle(import_graph(tmp_path)) == ["engines.a", "engines.b", "engines.a"]


# ---- the seam --------------------------------------------------------------------------------


def private_calls(path: Path, root: Path = ROOT) -> Iterator[str]:
    """``obj._method(...)`` where obj is not self, cls or super(): a private method called from outside."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        name, owner = node.func.attr, node.func.value
        if not name.startswith("_") or (name.startswith("__") and name.endswith("__")):
            continue
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
            continue
        yield f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node.func)}(...)"


def test_no_private_method_is_called_from_outside_its_class_in_engines():
    calls = [call for path in sorted((ROOT / "engines").rglob("*.py")) for call in private_calls(path)]
    assert not calls, "private methods called from outside their class:\n" + "\n".join(calls)


def test_the_private_call_check_finds_one(tmp_path):
    source = tmp_path / "engines" / "x.py"
    source.parent.mkdir()
    source.write_text(
        "class A:\n"
        "    def f(self, engine):\n"
        "        self._ok()\n        super()._ok()\n        engine.__len__()\n"
        "        engine._stream(1)\n"
    )
    assert list(private_calls(source, tmp_path)) == ["engines/x.py:6: engine._stream(...)"]


def property_writes(path: Path, root: Path = ROOT) -> Iterator[str]:
    """A ``@property`` that assigns to an attribute: a read that changes state."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not isinstance(node, ast.FunctionDef):
            continue
        if not any(isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list):
            continue
        for inner in ast.walk(node):
            targets = inner.targets if isinstance(inner, ast.Assign) else []
            if isinstance(inner, ast.AugAssign | ast.AnnAssign):
                targets = [inner.target]
            for target in targets:
                if isinstance(target, ast.Attribute | ast.Subscript):
                    yield f"{path.relative_to(root)}:{inner.lineno}: property {node.name} writes {ast.unparse(target)}"


def test_no_property_writes_state():
    writes = [
        w
        for package in ("engines", "server")
        for p in sorted((ROOT / package).rglob("*.py"))
        for w in property_writes(p)
    ]
    assert not writes, "properties that write:\n" + "\n".join(writes)


def test_the_property_check_finds_a_write(tmp_path):
    source = tmp_path / "x.py"
    source.write_text(
        "class A:\n    @property\n    def healthy(self):\n        self._failure = 'x'\n        return False\n"
    )
    assert list(property_writes(source, tmp_path)) == ["x.py:4: property healthy writes self._failure"]
