"""Which scope a tile came from, as a metric label: the name of the scope share its file lies on
(``EM_SCOPE_SHARES``, one share a microscope), so the label has as many values as the facility has scopes."""

from __future__ import annotations

import os
from collections.abc import Iterable

OTHER = "other"  # a tile on no configured share (a library caller that trusts its source)


def scope_of(path: str, shares: Iterable[str | os.PathLike[str]] | None) -> str:
    """The share's folder name for ``path`` (the longest share that holds it), or :data:`OTHER`."""
    best = ""
    for share in shares or ():
        root = os.path.normpath(os.fspath(share))
        if (path == root or path.startswith(root.rstrip(os.sep) + os.sep)) and len(root) > len(best):
            best = root
    name = os.path.basename(best.rstrip(os.sep))
    return name or OTHER
