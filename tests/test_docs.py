"""Every documentation reference in the code resolves to a file, and a section, of the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "src" / "safesteer").rglob("*.py"))
MARKDOWN = re.compile(r"[\w./-]*\w\.md\b")
SECTION = r"§\d+(?:\.\d+)?(?:[–-]\d+(?:\.\d+)?)?"
CITATION = re.compile(rf"(docs/[\w./-]+\.md)((?:,?\s*{SECTION})+)")
DOC_NAMES = {page.name for page in (REPO / "docs").glob("*.md")}  # output files (results.md) aside
HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)?)\.?\s", re.MULTILINE)


def sections(path: Path) -> set[str]:
    """The numbers of a Markdown file's numbered headings ("## 6." -> "6", "### 6.2" -> "6.2")."""
    return set(HEADING.findall(path.read_text(encoding="utf-8")))


def cited_sections(text: str) -> list[tuple[str, str]]:
    """(file, section number) for every "docs/NAME.md §N" citation; a range gives both ends."""
    cited = []
    for citation in CITATION.finditer(text):
        for section in re.findall(SECTION, citation.group(2)):
            first, _, last = section.removeprefix("§").replace("–", "-").partition("-")
            if last and "." in first and "." not in last:  # §6.2–4 means 6.2 to 6.4
                last = f"{first.rsplit('.', 1)[0]}.{last}"
            cited += [(citation.group(1), number) for number in (first, last) if number]
    return cited


def test_cited_sections_are_parsed_with_both_ends_of_a_range() -> None:
    text = "see docs/method.md §6.2–6.4 and docs/data.md §4, §5, and docs/method.md §6–7 (method.md)"
    assert cited_sections(text) == [("docs/method.md", "6.2"), ("docs/method.md", "6.4"),
                                     ("docs/data.md", "4"), ("docs/data.md", "5"),
                                     ("docs/method.md", "6"), ("docs/method.md", "7")]
    assert sections(REPO / "docs" / "method.md") >= {"6", "6.2", "9.8"}


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: str(path.relative_to(REPO / "src")))
def test_every_documentation_reference_resolves(source: Path) -> None:
    text = source.read_text(encoding="utf-8")
    mentioned = set(MARKDOWN.findall(text))
    missing_files = sorted(name for name in mentioned if name.startswith("docs/")
                           and not (REPO / name).is_file())
    assert not missing_files
    bare = sorted(name for name in mentioned if not name.startswith("docs/") and name in DOC_NAMES)
    assert not bare, f"cite documentation by its path in the repository (docs/NAME.md): {bare}"
    missing_sections = sorted({f"{name} §{number}" for name, number in cited_sections(text)
                               if number not in sections(REPO / name)})
    assert not missing_sections
    uncited = text.count("§") - sum(citation.group(2).count("§") for citation in CITATION.finditer(text))
    assert uncited == 0, "every § must follow the docs/NAME.md it numbers"
    assert "pitfall" not in text.lower(), "pitfalls are numbered in a file outside the repository"


def test_the_docs_link_only_to_files_that_exist() -> None:
    for page in (REPO / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+\.md)\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).is_file(), f"{page.name} links to missing {target}"
