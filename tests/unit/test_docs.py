"""The docs hold together: every relative link resolves, and docs/cli.md is what --help prints.

A link is relative when it names no scheme (``http:``, ``mailto:`` ...). Its file (or folder)
must exist, and a ``#fragment`` must be one of the target page's headings, slugged the way
GitHub slugs them. Code blocks and inline code are not read, so a path shown as an example
is not taken for a link.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def _repo_root() -> Path:
    here = Path(__file__).resolve().parent
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    raise RuntimeError(f"no pyproject.toml above {here}")


ROOT = _repo_root()
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
# The width `make docs` renders --help at (the Makefile's docs target sets the same COLUMNS).
HELP_COLUMNS = "100"

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _prose(text: str) -> str:
    """The page without its code: fenced blocks and inline code spans removed."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _HEADING.findall(_FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(page: Path) -> list[str]:
    prose = _prose(page.read_text(encoding="utf-8"))
    return _INLINE_LINK.findall(prose) + _REFERENCE_LINK.findall(prose)


def _broken(page: Path, target: str) -> str | None:
    """Why a relative link from ``page`` does not resolve, or None when it does."""
    path, _, fragment = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    if not resolved.exists():
        return f"{path} does not exist"
    if fragment and resolved.suffix == ".md" and fragment.lower() not in _anchors(resolved):
        return f"{resolved.relative_to(ROOT)} has no heading for #{fragment}"
    return None


def test_the_link_checker_reads_links_and_headings_as_github_does():
    assert _slug("Compiled decode (`--compile`)") == "compiled-decode---compile"
    assert _slug("The log's table: `make compare`") == "the-logs-table-make-compare"
    assert _slug("Security (TLS, token auth)") == "security-tls-token-auth"
    text = "a [page](docs/x.md#y) and ![plot](p.png 'title')\n`[not](a-link)`\n```\n[nor](this)\n```\n"
    prose = _prose(text)
    assert _INLINE_LINK.findall(prose) == ["docs/x.md#y", "p.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    relative = [link for link in _links(page) if link and not _SCHEME.match(link)]
    broken = [f"{link}: {why}" for link in relative if (why := _broken(page, link))]
    assert not broken, f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


def test_readme_links_every_docs_page():
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in _links(ROOT / "README.md")}
    results = ROOT / "docs" / "results"
    pages = [
        page
        for page in (ROOT / "docs").rglob("*.md")
        # a results page's own report folder is reached through that page
        if page.parent == ROOT / "docs" or page.parent == results
    ]
    missing = sorted(str(page.relative_to(ROOT)) for page in pages if page.resolve() not in linked)
    assert not missing, "README.md's Read more list does not link: " + ", ".join(missing)


def test_cli_page_is_what_help_prints():
    env = {**os.environ, "COLUMNS": HELP_COLUMNS, "NO_COLOR": "1"}
    env.pop("FORCE_COLOR", None)
    printed = subprocess.run(
        [sys.executable, "-m", "server.cli", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    header, _, rest = page.partition("```text\n")
    committed, _, _ = rest.rpartition("```")
    assert "make docs" in header, "docs/cli.md should say it is generated by `make docs`"
    assert committed == printed, "docs/cli.md is stale: run `make docs`"
