""" "No space left on device" names the filesystem, what it holds and what to do.

The operating system's message names neither the file nor the mount (a write through a buffer or a zarr
store often loses the file name), and an operator with several volumes (data root, downloads, Dagster's
storage, the system disk) cannot tell which one to clean. :func:`disk_full` finds the failure in an
exception's chain and says which mount filled, how full it is and which setting moves the data elsewhere.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator, Mapping

FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def mount_point(path: str) -> str:
    """The mount point of the filesystem that holds ``path`` (its nearest existing ancestor's)."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    while not os.path.ismount(p):
        p = os.path.dirname(p)
    return p


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _settings_for(target: str, mount: str, where: Mapping[str, str]) -> list[str]:
    """The settings whose folders hold ``target`` first, then the others on the same filesystem."""
    inside = [n for n, folder in where.items() if os.path.abspath(target).startswith(os.path.abspath(folder))]
    same = [n for n, folder in where.items() if n not in inside and mount_point(folder) == mount]
    return inside + same


def disk_full(exc: BaseException, where: Mapping[str, str | os.PathLike] | None = None) -> str | None:
    """A sentence for a full filesystem in ``exc``'s chain, or None when ``exc`` is something else.

    ``where``: the folders the failing step writes to, by the setting that places them (``EM_DATA_ROOT``:
    its path); used to name the setting, and, when the error carries no file name, the fullest of their
    filesystems.
    """
    full = next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in FULL), None)
    if full is None:
        return None
    local = {k: str(v) for k, v in (where or {}).items() if v and "://" not in str(v)}
    named = [str(p) for p in (full.filename, full.filename2) if p]
    fullest = sorted(local.values(), key=lambda folder: shutil.disk_usage(mount_point(folder)).free)
    target = next(iter(named or fullest), None)
    if target is None:
        return f"{full.strerror or 'no space left on device'}: free space on the volume the step writes to"
    mount = mount_point(target)
    usage = shutil.disk_usage(mount)
    quota = " (a quota: ask for more or free your files)" if full.errno == errno.EDQUOT else ""
    settings = _settings_for(target, mount, local)
    move = (
        f"point {' or '.join(settings)} at a larger volume"
        if settings
        else "move the data to a larger volume"
    )
    return (
        f"no space left on the filesystem mounted at {mount}{quota}, while writing {target}: "
        f"{_gib(usage.free)} free of {_gib(usage.total)}. Free space there or {move}, then re-run: "
        "nothing half-written was published"
    )
