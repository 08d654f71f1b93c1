"""What a cryo-live service killed mid-write leaves (a ``.part`` file or folder beside the final name) is
removed by the next start on the same host; a live process's, another host's and every finished file stay."""

from __future__ import annotations

import os
import subprocess
import sys

from em_platform.cryo import part_files
from em_platform.cryo.part_files import part_path, remove_left_behind


def test_only_parts_of_this_hosts_stopped_processes_are_removed(tmp_path):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(gone.stdout)  # a process that has ended: its number is free
    host = part_files._host()
    folder = tmp_path / "sessions" / "grid1" / "micrographs" / "micrographs"
    folder.mkdir(parents=True)
    (folder / "a.mrc").write_bytes(b"whole")
    left = folder / f".b.mrc.{host}.{dead}.part"
    left.write_bytes(b"half")
    tilts = tmp_path / "sessions" / "grid1" / "TS_01" / "tilts"
    (tilts / f".TS_01_001_-10.0.tif.{host}.{dead}.part").mkdir(parents=True)  # a tilt's folder, half-written
    (tilts / f".TS_01_001_-10.0.tif.{host}.{dead}.part" / "corrected.npy").write_bytes(b"half")
    mine = part_path(folder / "c.mrc")  # this process's: being written
    mine.write_bytes(b"writing")
    elsewhere = folder / f".d.mrc.otherhost.{dead}.part"  # another host's: its process is not ours to judge
    elsewhere.write_bytes(b"writing")

    assert remove_left_behind(tmp_path) == 2
    assert not left.exists() and not any(p.name.endswith(".part") for p in tilts.iterdir())
    assert mine.exists() and elsewhere.exists() and (folder / "a.mrc").read_bytes() == b"whole"
    assert mine.name == f".c.mrc.{host}.{os.getpid()}.part"
    assert remove_left_behind(tmp_path) == 0
