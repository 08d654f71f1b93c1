"""The spec folder (``EM_SIMULATIONS``): which specs are there, which stacks they make, which spec a stack
(partition key ``<spec name>_<NNN>``) belongs to.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from em_platform.edge import Refused, inside
from em_platform.simulation.cryoet.spec import Spec, SpecError, load_spec

SPEC_SUFFIXES = (".yaml", ".yml", ".json")
STACK_KEY = re.compile(r"^(?P<name>.+)_(?P<no>\d{3,})$")


@dataclass(frozen=True)
class SpecEntry:
    path: Path
    fingerprint: str  # sha1 of the file's bytes: a changed spec is simulated again
    mtime: float
    spec: Spec | None
    error: str | None


def _entry(path: Path) -> SpecEntry:
    data = path.read_bytes()
    fingerprint = hashlib.sha1(data).hexdigest()[:16]
    try:
        return SpecEntry(path, fingerprint, path.stat().st_mtime, load_spec(path), None)
    except SpecError as exc:
        return SpecEntry(path, fingerprint, path.stat().st_mtime, None, str(exc))


def _refused(path: Path, exc: Refused) -> SpecEntry:
    st = path.lstat()
    fingerprint = hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}:{exc}".encode()).hexdigest()[:16]
    return SpecEntry(path, fingerprint, st.st_mtime, None, f"{path}: {exc}")


def scan_specs(folder: Path) -> list[SpecEntry]:
    """Every spec file in the folder (not hidden, not partial), loaded or with the reason it is bad.

    A spec that is a symlink resolving outside the folder is never read (:func:`em_platform.edge.inside`).
    """
    if not folder.is_dir():
        return []
    entries = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in SPEC_SUFFIXES:
            continue
        try:
            inside(folder, path.name, field="spec file")
        except Refused as exc:
            entries.append(_refused(path, exc))
            continue
        if not path.is_file():
            continue
        try:
            entries.append(_entry(path))
        except FileNotFoundError:  # removed while we looked
            continue
    seen: dict[str, Path] = {}
    out = []
    for e in entries:
        if e.spec is not None and e.spec.name in seen:
            e = SpecEntry(
                e.path,
                e.fingerprint,
                e.mtime,
                None,
                f"{e.path}: name {e.spec.name!r} is already used by {seen[e.spec.name]}",
            )
        elif e.spec is not None:
            seen[e.spec.name] = e.path
        out.append(e)
    return out


def parse_stack_key(key: str) -> tuple[str, int]:
    match = STACK_KEY.match(key)
    if not match:
        raise SpecError(f"{key!r} is not a stack name of the form <spec name>_<NNN>")
    return match["name"], int(match["no"])


def find_stack_spec(folder: Path, key: str) -> tuple[Spec, int, SpecEntry]:
    """The spec that makes stack ``key`` and its stack number; SpecError says what is missing or bad."""
    name, no = parse_stack_key(key)
    entries = scan_specs(folder)
    for e in entries:
        if e.spec is not None and e.spec.name == name:
            if no >= e.spec.num_stacks:
                raise SpecError(f"{e.path}: spec {name!r} has num_stacks {e.spec.num_stacks}; no stack {key}")
            return e.spec, no, e
    bad = [e.error for e in entries if e.error and Path(e.path).stem == name]
    if bad:
        raise SpecError(bad[0])
    raise SpecError(f"no spec named {name!r} in {folder} (stack {key}); was its file removed or renamed?")
