"""Every relative link in the README and the docs leads to a file that exists, and every
`#anchor` to one of its headings (GitHub's slugs), so that moving a section or a file is
caught here rather than by a reader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ..conftest import REPO

PAGES = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "examples").glob("**/README.md")),
    REPO / "bench" / "HISTORY.md",
]
FENCED = re.compile(r"```.*?```", re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", FENCED.sub("", page.read_text()), re.M)}


def relative_links(page: Path) -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)\)", FENCED.sub("", page.read_text()))
    return [link for link in links if not re.match(r"[a-z]+:", link)]


def test_slugs_follow_github():
    assert slug("On a GPU") == "on-a-gpu"
    assert slug("Several processes (DDP)") == "several-processes-ddp"
    assert slug("Config-only keys") == "config-only-keys"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for link in relative_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in headings(target):
            broken.append(f"{link}: no heading #{anchor} in {target.name}")
    assert not broken, broken


def test_the_readme_links_every_docs_page():
    readme = {
        (REPO / link.partition("#")[0]).resolve() for link in relative_links(REPO / "README.md")
    }
    unlinked = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in readme]
    assert not unlinked, unlinked
