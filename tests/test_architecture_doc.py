"""docs/architecture.md's source tree names every package and top-level module of em_platform, and nothing that
is gone: a newcomer reading it finds each home the code has.

An entry is a line of the tree's ``em_platform/`` block indented by two spaces whose first word is a path below
``em_platform/``: ``name/`` for a package (nested ones as ``simulation/cryoet/``), ``name.py`` for a top-level
module. Deeper-indented lines continue an entry's description. Modules inside packages are not required: the
tree is a map of homes, not a file listing."""

from __future__ import annotations

import re
from pathlib import Path

import em_platform

PACKAGE = Path(em_platform.__file__).parent
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
SECTION = "## The source tree"


def tree_entries(text: str) -> list[str]:
    """The first word of each entry line of the ``em_platform/`` block in the section's first code block."""
    if SECTION not in text:
        raise AssertionError(f"{DOC} has no {SECTION!r} section")
    section = text.split(SECTION, 1)[1]
    block = re.search(r"^```[a-z]*\n(.*?)^```", section, re.S | re.M)
    if block is None:
        raise AssertionError(f"{DOC}'s {SECTION!r} section has no code block with the tree")
    lines = block.group(1).splitlines()
    if "em_platform/" not in [line.strip() for line in lines]:
        raise AssertionError(f"{DOC}'s tree has no 'em_platform/' line heading the package's entries")
    start = [line.strip() for line in lines].index("em_platform/") + 1
    entries = []
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break  # the next top-level folder (docker/, tests/ ...)
        if re.match(r"^ {2}\S", line):
            entries.append(line.split()[0])
    return entries


def packages() -> set[str]:
    """Every package below em_platform (a folder with __init__.py), as ``name/`` or ``name/sub/``."""
    return {
        f"{init.parent.relative_to(PACKAGE).as_posix()}/"
        for init in PACKAGE.rglob("__init__.py")
        if init.parent != PACKAGE and "__pycache__" not in init.parts
    }


def top_level_modules() -> set[str]:
    return {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}


def test_the_tree_names_every_package_and_top_level_module():
    named = set(tree_entries(DOC.read_text()))
    missing = sorted((packages() | top_level_modules()) - named)
    assert not missing, (
        f"docs/architecture.md's source tree leaves out {missing}: give each a line under 'em_platform/' "
        "(two spaces in, then the name and what it holds)"
    )


def test_everything_the_tree_names_is_there():
    gone = sorted(e for e in tree_entries(DOC.read_text()) if not (PACKAGE / e).exists())
    assert not gone, f"docs/architecture.md's source tree names {gone}, which em_platform no longer has"


def test_a_tree_without_a_package_is_caught():
    # the check itself: a tree that leaves out one package is reported with the package's name
    text = DOC.read_text()
    without = "\n".join(line for line in text.splitlines() if not line.startswith("  cluster/"))
    assert "cluster/" in packages()
    assert "cluster/" not in tree_entries(without)
    assert "cluster/" in (packages() | top_level_modules()) - set(tree_entries(without))
