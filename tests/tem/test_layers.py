"""The layer rule between acquisition and stitching: ``tem`` builds on ``stitch``, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

import em_platform

PACKAGE = Path(em_platform.__file__).parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_stitch_imports_nothing_from_tem():
    offending = {
        f"{p.relative_to(PACKAGE)}: {m}"
        for p in sorted((PACKAGE / "stitch").rglob("*.py"))
        for m in _imports(p)
        if m == "em_platform.tem" or m.startswith("em_platform.tem.")
    }
    assert not offending, f"stitch must not import tem: {sorted(offending)}"


def test_tem_uses_the_grid_geometry_of_stitch():
    users = {p.name for p in (PACKAGE / "tem").glob("*.py") if "em_platform.stitch.grid" in _imports(p)}
    assert users, "tem should take tile-grid geometry from em_platform.stitch.grid"
