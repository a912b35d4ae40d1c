"""Every repo path the docs name exists: README.md and docs/**/*.md cannot drift from the tree.

Two kinds of mention are read, outside fenced code blocks:

- a markdown link to a relative target (its ``#anchor`` stripped): ``[text](docs/x.md#y)``;
- a word inside an inline code span that looks like a repo path: it starts with one of the
  repo's top-level folders and a slash (``server/``, ``engines/`` ...), or it is a top-level
  file (``Makefile``, ``pyproject.toml`` ...). ``path::test`` and ``path:line`` name the path.

Left out by rule, because they name no file that a clone holds:

- anything under ``reports/``, which the tools write at run time;
- glob and placeholder forms: a ``*``, ``<``, ``{``, ``...``, ``$`` or ``%`` in the word, or a
  part in upper case and underscores such as ``RUN_FOLDER`` (``reports/`` is out anyway);
- a link with a scheme (``https:``, ``mailto:``).

A link in a docs page resolves from that page's folder; a path in a code span is read from the
repo's root, as a command typed there would, unless it only exists beside the page.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
TOP_FOLDERS = ("server", "engines", "loadtest", "bench", "scripts", "deploy", "tests", "docs", "protos", ".ci")
TOP_FILES = ("Makefile", "pyproject.toml", "README.md", ".gitignore")
GENERATED = ("reports/",)

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"(`+)((?:(?!\1).)+?)\1", re.DOTALL)
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_PLACEHOLDER = re.compile(r"[*<{$%]|\.\.\.|(^|/)[A-Z][A-Z0-9_]*[A-Z0-9](/|$|\.)")
_PATH_WORD = re.compile(
    "^(?:"
    + "|".join(re.escape(f"{top}/") for top in TOP_FOLDERS)
    + ")\\S*$|^(?:"
    + "|".join(re.escape(name) for name in TOP_FILES)
    + ")$"
)


def _blank_fences(text: str) -> str:
    """The page with its fenced blocks blanked out, lines kept so line numbers still match."""
    return _FENCE.sub(lambda block: "\n" * block.group(0).count("\n"), text)


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _clean(word: str) -> str:
    """A code span's word as a path: quotes and trailing punctuation off, ``::test`` and ``:line`` off."""
    word = word.strip("\"'(),;")
    word = word.split("::", 1)[0]
    return re.sub(r":\d+(?:-\d+)?$", "", word).rstrip(".:")


def _excluded(path: str) -> bool:
    return path.startswith(GENERATED) or bool(_PLACEHOLDER.search(path))


def mentions(page: Path) -> list[tuple[int, str, Path]]:
    """(line, path as written, where it must exist) for every repo path the page names."""
    text = _blank_fences(page.read_text(encoding="utf-8"))
    found: list[tuple[int, str, Path]] = []
    for span in _INLINE_CODE.finditer(text):
        for word in re.finditer(r"\S+", span.group(2)):
            path = _clean(word.group(0))
            if _PATH_WORD.match(path) and not _excluded(path):
                found.append((_line(text, span.start(2) + word.start()), path, ROOT / path))
    prose = _INLINE_CODE.sub(lambda span: " " * len(span.group(0)), text)
    for pattern in (_INLINE_LINK, _REFERENCE_LINK):
        for link in pattern.finditer(prose):
            target = link.group(1).partition("#")[0]
            if target and not _SCHEME.match(target) and not _excluded(target):
                found.append((_line(prose, link.start()), target, page.parent / target))
    return found


def _exists(page: Path, written: str, where: Path) -> bool:
    return where.exists() or (page.parent / written).exists()


def test_the_reader_finds_links_and_code_paths_and_leaves_out_placeholders(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "See [the design](design.md#goals) and `engines/base.py`, `make test PYTEST_ARGS=-x`,\n"
        "`tests/unit/test_x.py::test_y`, `server/app.py:12`, `Makefile`.\n"
        "`reports/speed-<UTC>/speed.md`, `deploy/k8s/*.yaml`, `docs/results/RUN_FOLDER/x.md`, `{a,b}`\n"
        "```\nserver/not_read.py\n```\n[site](https://example.org) [x](loadtest/speed.py)\n",
        encoding="utf-8",
    )
    assert [(line, written) for line, written, _ in mentions(page)] == [
        (1, "engines/base.py"),
        (2, "tests/unit/test_x.py"),
        (2, "server/app.py"),
        (2, "Makefile"),
        (1, "design.md"),
        (7, "loadtest/speed.py"),
    ]


def test_the_top_level_names_exist():
    missing = [name for name in (*TOP_FOLDERS, *TOP_FILES) if not (ROOT / name).exists()]
    assert not missing, f"TOP_FOLDERS/TOP_FILES name what the repo does not hold: {missing}"


def test_every_path_the_docs_name_exists():
    missing = [
        f"{page.relative_to(ROOT)}:{line}: {written}"
        for page in PAGES
        for line, written, where in mentions(page)
        if not _exists(page, written, where)
    ]
    print("\n".join(missing))
    assert not missing, f"{len(missing)} paths named in the docs do not exist:\n" + "\n".join(missing)
