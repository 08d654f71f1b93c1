"""Deleting under a root without ever following a symlink or leaving the root: what the buffer and the cryo
policies let go of goes through here, so a link planted in a working folder (to the archive, to a home folder)
can make neither delete anything it points at."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path


class NotFollowed(ValueError):
    """A path to let go of is a symlink, passes through one, or resolves outside its root: it is kept."""


def checked(root: str | os.PathLike, relative: str) -> Path:
    """``root/relative``, which must exist and resolve to itself under ``root``: no part of it a symlink, no ``..``.

    The root itself may be a link (an operator's mount); what lies under it may not. Raises :class:`NotFollowed`.
    """
    base = Path(os.path.realpath(root))
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute() or any(p in ("", ".", "..") for p in parts):
        raise NotFollowed(f"{relative!r}: not a plain path below {base}")
    path = base.joinpath(*parts)
    if os.path.realpath(path) != str(path):
        raise NotFollowed(
            f"{path}: a symlink, or below one (resolves to {os.path.realpath(path)}); not followed"
        )
    return path


def changed_since(path: Path, moment: float) -> bool:
    """Whether anything in the tree at ``path`` (itself included; links not followed) changed at or after
    ``moment`` (a Unix time); stops at the first that did."""
    if os.lstat(path).st_mtime >= moment:
        return True
    for folder, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            try:
                if os.lstat(os.path.join(folder, name)).st_mtime >= moment:
                    return True
            except FileNotFoundError:
                continue
    return False


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files in the tree at ``path`` (links not followed)."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        return info.st_size if stat.S_ISREG(info.st_mode) else 0
    total = 0
    for folder, _dirs, files in os.walk(path, followlinks=False):
        for name in files:
            try:
                info = os.lstat(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total


def remove(path: Path) -> int:
    """Delete the file or tree at ``path`` (from :func:`checked`); a link inside is removed, never followed
    (``shutil.rmtree`` works on file descriptors here). Bytes freed."""
    freed = tree_bytes(path)
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
    return freed
