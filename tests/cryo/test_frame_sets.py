"""Finding a live session's movies: frame-set mdocs found as they land, a folder listed again only once it
changed, an mdoc caught half-written read again, a folder linked out of the root refused."""

from __future__ import annotations

import os

from em_platform.cryo import frame_sets
from em_platform.cryo.frame_sets import FrameSetWatch

FRAME_SET = "PixelSpacing = 1.0\n\n[FrameSet = 0]\nNumSubFrames = 4\n"
TILT_SERIES = "PixelSpacing = 1.0\n\n[ZValue = 0]\nTiltAngle = 0\n"


def test_frame_set_mdocs_are_found_as_they_land_and_unchanged_folders_are_not_listed_again(
    tmp_path, monkeypatch
):
    root = tmp_path / "sessions"
    (root / "grid1").mkdir(parents=True)
    (root / "grid1" / "a.tif.mdoc").write_text(FRAME_SET)
    (root / "grid1" / "TS_01.mrc.mdoc").write_text(TILT_SERIES)  # a tilt series: not a movie set
    (root / "grid1" / "b.tif.mdoc").write_text("PixelSpacing = 1.0\n")  # SerialEM half-way through it
    watch = FrameSetWatch(root, "sessions")
    first = watch.scan()
    assert {f.name: [m.name for m in ms] for f, ms in first.new.items()} == {"grid1": ["a.tif.mdoc"]}
    assert first.set_folders == [root / "grid1"]
    assert [m.name for m in first.others] == ["TS_01.mrc.mdoc", "b.tif.mdoc"]  # for the sensor to describe
    assert watch.session_key(root / "grid1") == "sessions/grid1/micrographs"
    listed, read = [], []
    real_scandir, real_is_frame_set = os.scandir, frame_sets.is_frame_set
    monkeypatch.setattr(os, "scandir", lambda p: listed.append(p) or real_scandir(p))
    monkeypatch.setattr(frame_sets, "is_frame_set", lambda p: read.append(p.name) or real_is_frame_set(p))
    again = watch.scan()
    assert (listed, read, again.new, again.set_folders) == ([], [], {}, [root / "grid1"])  # nothing changed
    (root / "grid1" / "b.tif.mdoc").write_text(FRAME_SET)  # now written whole
    os.utime(root / "grid1" / "b.tif.mdoc", ns=(1, 2))  # and changed, whatever the clock's resolution
    (root / "grid1" / "c.tif.mdoc").write_text(FRAME_SET)
    grown = watch.scan()
    assert [m.name for m in grown.new[root / "grid1"]] == ["b.tif.mdoc", "c.tif.mdoc"]  # only what is new
    assert listed == [root / "grid1"]  # only the folder that changed
    assert sorted(read) == ["b.tif.mdoc", "c.tif.mdoc"]  # a, read before, and TS_01, unchanged, not again
    assert [m.name for m in grown.others] == ["TS_01.mrc.mdoc"]
    (root / "grid1" / "a.tif.mdoc").unlink()
    assert watch.scan().new == {} and watch.frame_sets[root / "grid1"] == {"b.tif.mdoc", "c.tif.mdoc"}


def test_a_folder_linked_out_of_the_root_is_refused_and_one_linked_back_up_walked_once(tmp_path):
    root, outside = tmp_path / "sessions", tmp_path / "outside"
    (root / "grid1").mkdir(parents=True)
    outside.mkdir()
    (root / "grid1" / "a.tif.mdoc").write_text(FRAME_SET)
    (outside / "x.tif.mdoc").write_text(FRAME_SET)
    os.symlink(outside, root / "elsewhere")
    os.symlink(root, root / "grid1" / "up")
    watch = FrameSetWatch(root, "sessions")
    for _ in range(2):  # refused by every scan, the folder listed or not
        found = watch.scan()
        assert list(found.set_folders) == [root / "grid1"]
        assert [path for path, _ in found.refused] == [root / "elsewhere"]
        assert "outside" in str(found.refused[0][1])
