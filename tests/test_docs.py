"""The documentation holds together: every section the code names exists, every relative link
resolves, and the README stays a front page."""

import re

from tests.conftest import REPO

# How code and docs cite a section: docs/training.md, "Metrics" (the comma optional; a line may break).
CITATION = re.compile(r"((?:docs/[\w.-]+|[\w/]*README)\.md),?\s+\"([^\"]+)\"")
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")
SCANNED = ("pipeline", "tests", "bench", "launch", "slurm", "configs", "docs")


def headings(path) -> set[str]:
    return {line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")}


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return "#" + re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def scanned_files():
    for folder in SCANNED:
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".sh", ".sbatch", ".yaml") and path.is_file():
                yield path
    yield REPO / "README.md"


def test_every_cited_section_exists():
    missing = []
    for path in scanned_files():
        for document, section in CITATION.findall(path.read_text()):
            target = REPO / document
            if not target.is_file() or section not in headings(target):
                missing.append(f"{path.relative_to(REPO)} cites {document}, {section!r}")
    assert missing == []


def test_every_relative_link_in_the_docs_resolves():
    broken = []
    for path in [REPO / "README.md", REPO / "bench" / "README.md", *(REPO / "docs").glob("*.md")]:
        for target, fragment in LINK.findall(path.read_text()):
            if "://" in target:
                continue
            resolved = (path.parent / target).resolve()
            if not resolved.exists():
                broken.append(f"{path.relative_to(REPO)} -> {target}")
            elif fragment and resolved.suffix == ".md" and fragment not in {anchor(h) for h in headings(resolved)}:
                broken.append(f"{path.relative_to(REPO)} -> {target}{fragment}")
    assert broken == []


def test_the_readme_is_a_front_page_with_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    assert "bash launch/quickstart.sh" in readme and "bash tests/run.sh" in readme
    assert "tests/run.sh" in (REPO / ".ci" / "run").read_text()
