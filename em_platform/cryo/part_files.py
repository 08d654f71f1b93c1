"""cryo-live's files written whole: each first as ``.<name>.<host>.<pid>.part`` beside its final name (a file,
or a folder of files), then renamed into place, so no reader ever sees half of one. One that a process
killed mid-write leaves behind is removed by the next service that starts on the same host
(:func:`remove_left_behind`): its process is gone. Another host's, or a live process's, is left alone."""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

_PART = re.compile(r"^\..+\.(?P<host>[^.]+)\.(?P<pid>\d+)\.part$")


def part_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    return path.with_name(f".{path.name}.{_host()}.{os.getpid()}.part")


def remove_left_behind(root: Path) -> int:
    """Remove the parts under ``root`` of this host's processes that are gone; returns how many."""
    removed, host = 0, _host()
    pending = [root]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue
        for entry in entries:
            found = _PART.match(entry.name)
            if found and found["host"] == host and not pid_alive(found["pid"]):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    Path(entry.path).unlink(missing_ok=True)
                removed += 1
            elif entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
    return removed


def pid_alive(pid: str | int) -> bool:
    """A process of that number runs on this host (another user's counts)."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _host() -> str:
    return socket.gethostname().split(".")[0] or "host"
