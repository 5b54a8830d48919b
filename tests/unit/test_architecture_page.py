"""docs/architecture.md draws the package's tree as it is: every module, no module that is gone."""

from __future__ import annotations

import re

from ..conftest import REPO

PACKAGE = REPO / "src" / "dlharness"


def _tree_block() -> str:
    page = (REPO / "docs" / "architecture.md").read_text()
    start = page.index("src/dlharness/\n")
    return page[start : page.index("```", start)]


def test_every_module_of_the_package_is_on_the_page():
    block = _tree_block()
    modules = [p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    missing = [str(p.relative_to(PACKAGE)) for p in modules if p.name not in block]
    assert not missing, f"not on docs/architecture.md: {missing}"


def test_every_module_the_page_names_exists():
    named = set(re.findall(r"\b([a-z_]+\.py)\b", _tree_block()))
    present = {p.name for p in REPO.glob("**/*.py") if ".venv" not in p.parts}
    assert named <= present, f"named but gone: {sorted(named - present)}"


def test_every_package_folder_is_on_the_page():
    block = _tree_block()
    folders = [p for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE]
    missing = [p.parent.name for p in folders if f"{p.parent.name}/" not in block]
    assert not missing, f"packages not on docs/architecture.md: {missing}"
