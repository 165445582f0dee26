"""The documentation a person who clones the repository reads: its links resolve inside the
repository, the README stays one screen, and the configuration page names every setting."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.helpers import PRODUCT_PACKAGES

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 80

# Markdown the repository ships to readers (tooling caches and node_modules are not ours).
DOC_FILES = sorted(
    {
        ROOT / "README.md",
        *ROOT.glob("docs/**/*.md"),
        *ROOT.glob("examples/**/*.md"),
        *ROOT.glob("deploy/**/*.md"),
        *ROOT.glob("contracts/**/*.md"),
    }
)
SOURCE_PACKAGES = (*PRODUCT_PACKAGES, "devtools")

_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_SETTING_LITERAL = re.compile(r"[\"'](OPSMESH_[A-Z0-9_]*[A-Z0-9])[\"']")
# Names in the code that are no setting: a docstring's placeholder.
_NOT_SETTINGS = {"OPSMESH_X"}


def _prose(text: str) -> str:
    """The text a reader follows links in: code blocks and inline code are examples, not links."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def links_in(text: str) -> list[str]:
    return [m.group(1) for m in _LINK.finditer(_prose(text))]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces become hyphens."""
    plain = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", plain))


def anchors_of(path: Path) -> set[str]:
    return {_slug(h) for h in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8")))}


def broken_links(doc: Path, text: str | None = None) -> list[str]:
    """Every relative link of ``doc`` (or of ``text`` placed there) that leaves the repository or
    names nothing in it."""
    problems = []
    for target in links_in(doc.read_text(encoding="utf-8") if text is None else text):
        if _EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (doc.parent / unquote(path_part)).resolve() if path_part else doc
        if not resolved.is_relative_to(ROOT):
            problems.append(f"{target}: outside the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such path")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors_of(resolved):
            problems.append(f"{target}: no heading #{anchor} in {resolved.name}")
    return problems


def test_the_docs_are_found() -> None:
    names = {doc.relative_to(ROOT).as_posix() for doc in DOC_FILES}
    assert {"README.md", "docs/architecture.md", "docs/configuration.md"} <= names
    assert {"examples/README.md", "deploy/SCALING.md", "docs/services/edge.md"} <= names


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves_inside_the_repository(doc: Path) -> None:
    assert broken_links(doc) == []


def test_the_link_check_catches_what_a_reader_would_trip_over() -> None:
    text = (
        "[gone](services/nowhere.md) [out](../../shared/DESIGN.md) [ok](architecture.md) "
        "[bad anchor](architecture.md#no-such-heading) [good anchor](architecture.md#decisions) "
        "[web](https://example.com/x.md) `[code](not/a/link.md)`\n```\n[fenced](nor/this.md)\n```\n"
    )
    assert links_in(text) == [
        "services/nowhere.md",
        "../../shared/DESIGN.md",
        "architecture.md",
        "architecture.md#no-such-heading",
        "architecture.md#decisions",
        "https://example.com/x.md",
    ]
    assert broken_links(ROOT / "docs" / "probe.md", text) == [
        "services/nowhere.md: no such path",
        "../../shared/DESIGN.md: outside the repository",
        "architecture.md#no-such-heading: no heading #no-such-heading in architecture.md",
    ]


def test_no_document_points_at_the_design_brief_outside_the_repository() -> None:
    for doc in DOC_FILES:
        assert "shared/DESIGN.md" not in doc.read_text(encoding="utf-8"), doc


def test_the_readme_fits_one_screen() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    text = "\n".join(lines)
    for needed in ("make up", "make test", "docs/architecture.md", "docs/configuration.md"):
        assert needed in text


def _settings_in_code() -> set[str]:
    found: set[str] = set()
    for package in SOURCE_PACKAGES:
        for source in (ROOT / package).rglob("*.py"):
            found |= set(_SETTING_LITERAL.findall(source.read_text(encoding="utf-8")))
    return found - _NOT_SETTINGS


def test_the_configuration_page_names_every_setting_the_code_reads() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"OPSMESH_[A-Z0-9_<>]*[A-Z0-9>]", page))
    settings = _settings_in_code()
    assert "OPSMESH_SESSION_TTL" in settings  # the scan sees the code
    assert sorted(settings - documented) == []
