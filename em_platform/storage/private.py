"""Files only their owner may read (keys, secrets), private from the moment they exist.

Writing a file and then ``chmod``-ing it leaves a window in which the umask's mode (often 0644) lets anyone
read it; here the file is created with mode 0600 by ``os.open`` (a umask can only narrow that), never through
a symbolic link someone left in its place, and renamed over its final name only once complete.
"""

from __future__ import annotations

import os
from pathlib import Path

# created only if absent, never through a symbolic link someone left in the folder
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_private(path: str | os.PathLike, data: str | bytes, *, mode: int = 0o600) -> Path:
    """``data`` into ``path`` (replacing what is there) through a new file of ``mode`` renamed over it."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)  # a partial left by a writer that died
    fd = os.open(partial, _CREATE, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path
