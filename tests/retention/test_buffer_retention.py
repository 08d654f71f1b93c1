"""The acquisition buffer's policy: an archived montage's folder goes once its archive verifies, a montage
never archived goes only while its raw tiles are there to make it again; a montage in flight, one written or
changed within the window, one the journal does not know, a reserved name and anything behind a symlink stay."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from em_platform.catalog.db import CatalogDB, datasets
from em_platform.retention.buffer import apply_buffer_policy
from em_platform.retention.files import NotFollowed, checked
from em_platform.storage.upload import upload_buffer
from em_platform.tem.buffer_layout import UPLOADED
from em_platform.tem.journal import Journal, montages

NOW = datetime.now(UTC)
BEFORE = NOW - timedelta(days=14)


class Facility:
    """A journal, a catalog, a buffer and an archive in ``tmp_path``; montages made in them at will."""

    def __init__(self, tmp_path: Path):
        url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
        self.journal, self.catalog = Journal(url), CatalogDB(url)
        self.buffer, self.archive, self.share = tmp_path / "buffer", tmp_path / "archive", tmp_path / "scope"
        for folder in (self.buffer, self.archive, self.share):
            folder.mkdir()

    def acquired(self, montage_id: str, *, finished: bool = True, days: int = 20) -> None:
        """A montage with two raw tiles on the scope's share, its journal row last changed ``days`` ago."""
        j = self.journal
        j.record("montage.status", {"montage_id": montage_id, "state": "in_progress", "total_tiles": 2})
        for i in range(2):
            path = self.share / f"{montage_id}_{i}.tif"
            path.write_bytes(b"raw")
            tile = {"montage_id": montage_id, "tile_id": f"{montage_id}_{i}", "row": 0, "column": i}
            j.record("tile.raw", tile | {"path": str(path)})
        if finished:
            j.record("montage.status", {"montage_id": montage_id, "state": "completed", "total_tiles": 2})
        with j.engine.begin() as conn:
            when = NOW - timedelta(days=days)
            conn.execute(montages.update().where(montages.c.montage_id == montage_id).values(updated_at=when))

    def processed(self, montage_id: str, days: int = 20) -> int:
        """Its buffer folder as the montage run leaves it (and a TIFF the upload does not take); bytes."""
        folder = self.buffer / montage_id
        files = {
            "processed_tiles.zarr/zarr.json": b"{}",
            "processed_tiles.zarr/r0c0/c/0/0": b"p" * 4000,
            "montage.ome.zarr/zarr.json": b"{}",
            "montage.ome.zarr/0/c/0/0": b"m" * 3000,
            "layout.json": b"{}",
            "montage.json": b"{}",
            "metadata.json": b"{}",
            "processed/r0c0.tif": b"t" * 500,
        }
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        age(folder, days)
        return sum(len(b) for b in files.values())

    def archived(self, montage_id: str, days: int = 20) -> None:
        """Uploaded with its manifest, its catalog record complete ``days`` ago."""
        upload_buffer(self.buffer / montage_id, str(self.archive / montage_id), sources=UPLOADED)
        age(self.buffer / montage_id, days)
        self.record(montage_id, "complete", days)

    def record(self, montage_id: str, status: str, days: int) -> None:
        when = NOW - timedelta(days=days)
        row = {"source": "acquisition", "source_id": montage_id, "status": status, "retry_count": 0}
        with self.catalog.engine.begin() as conn:
            conn.execute(
                datasets.insert().values(
                    id=str(uuid.uuid4()), record={}, created_at=when, updated_at=when, **row
                )
            )

    def apply(self, busy=(), reserved=()):
        return apply_buffer_policy(
            self.buffer,
            journal=self.journal,
            catalog=self.catalog,
            before=BEFORE,
            busy=busy,
            archive_url=lambda montage_id: str(self.archive / montage_id),
            reserved=reserved,
            now=NOW,
        )


def age(path: Path, days: int) -> None:
    when = (NOW - timedelta(days=days)).timestamp()
    for p in [path, *path.rglob("*")]:
        os.utime(p, (when, when), follow_symlinks=False)


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def facility(tmp_path) -> Facility:
    return Facility(tmp_path)


def test_what_goes_and_what_stays(facility):
    f = facility
    freed = 0
    for montage_id in ("archived", "corrupt", "fresh", "queued"):  # all uploaded and recorded complete
        f.acquired(montage_id)
        size = f.processed(montage_id)
        f.archived(montage_id, days=2 if montage_id == "fresh" else 20)
        freed += size if montage_id == "archived" else 0
    resumable = f.buffer / ".staging" / "montage-archived" / "processed_tiles.zarr"
    resumable.mkdir(parents=True)
    (resumable / "zarr.json").write_bytes(b"{}")  # a killed re-run's staging: goes with its montage
    freed += 2
    (f.archive / "corrupt" / "montage.json").write_bytes(b"{ }")  # the archive changed since its upload
    for montage_id in ("failed", "lost", "acquiring", "touched", "judged"):  # never archived
        f.acquired(montage_id, finished=montage_id != "acquiring")
        size = f.processed(montage_id)
        freed += size if montage_id == "failed" else 0
    f.record("failed", "failed", 20)
    for tile in f.share.glob("lost_*"):
        tile.unlink()  # the scope's share let go of its raw tiles: the buffer holds the only copy
    (f.buffer / "touched" / "layout.json").write_bytes(b"{}")  # an operator's re-run wrote it today
    assert f.journal.claim_judging("judged", "live-qc@scope1", 600)
    f.processed("stranger")  # no montage the journal knows
    f.processed("cryo")  # the cryo work root, when the data root is object storage
    (f.buffer / "notes.txt").write_text("an operator's")
    for name, days in (("0123abcd", 20), ("feedbeef", 1)):  # killed writes' staging
        (f.buffer / ".staging" / name / "montage.ome.zarr").mkdir(parents=True)
        (f.buffer / ".staging" / name / "montage.ome.zarr" / "zarr.json").write_bytes(b"{}")
        age(f.buffer / ".staging" / name, days)
    freed += 2
    age(f.buffer / ".staging" / "montage-archived", 20)
    archives = {m: tree(f.archive / m) for m in ("archived", "corrupt")}
    stays = {p.name for p in f.buffer.iterdir()} - {"archived", "failed"}
    contents = {name: tree(f.buffer / name) for name in stays - {".staging", "notes.txt"}}

    report = f.apply(busy={"queued"}, reserved={"cryo"})

    assert sorted(report.removed) == ["archived", "failed"]
    assert report.freed_bytes == freed
    assert {p.name for p in f.buffer.iterdir()} == stays
    assert {name: tree(f.buffer / name) for name in contents} == contents  # every file of what stays
    assert sorted(p.name for p in (f.buffer / ".staging").iterdir()) == ["feedbeef"]
    assert {m: tree(f.archive / m) for m in archives} == archives  # the archive, untouched
    why = report.kept
    assert "does not verify" in why["corrupt"] and "within the window" in why["fresh"]
    assert "run of it" in why["queued"] and "in_progress" in why["acquiring"]
    assert "within the window" in why["touched"] and "live-qc@scope1" in why["judged"]
    assert "only copy" in why["lost"] and "does not know" in why["stranger"] and "cryo" not in why
    assert any("lost" in w for w in report.warnings) and any("corrupt" in w for w in report.warnings)

    again = f.apply(busy={"queued"}, reserved={"cryo"})
    assert (again.removed, again.freed_bytes) == ([], 0)
    assert {name: tree(f.buffer / name) for name in contents} == contents


def test_a_symlink_is_never_followed_nor_a_path_outside_the_buffer(facility, tmp_path):
    f = facility
    outside = tmp_path / "elsewhere"
    (outside / "montage-gone").mkdir(parents=True)
    (outside / "precious").write_bytes(b"keep me")
    age(outside, 30)
    before = tree(outside)
    for montage_id in ("linked", "failed"):
        f.acquired(montage_id)
    f.record("linked", "complete", 20)
    (f.buffer / "linked").symlink_to(outside, target_is_directory=True)  # a montage's folder is a link
    f.processed("failed")
    (f.buffer / "failed" / "processed" / "to_file").symlink_to(outside / "precious")
    (f.buffer / "failed" / "processed" / "to_folder").symlink_to(outside, target_is_directory=True)
    (f.buffer / ".staging").symlink_to(outside, target_is_directory=True)  # its staging a link
    age(f.buffer / "failed", 20)

    report = f.apply()

    assert report.removed == ["failed"] and not (f.buffer / "failed").exists()  # the links in it, not behind
    assert tree(outside) == before
    assert (f.buffer / "linked").is_symlink() and "symlink" in report.kept["linked"]
    assert "symlink" in report.kept[".staging"]


@pytest.mark.parametrize("relative", ["", ".", "../elsewhere", "a/../../elsewhere", "a/..", "/etc"])
def test_a_path_that_is_not_plainly_below_the_root_is_refused(tmp_path, relative):
    with pytest.raises(NotFollowed):
        checked(tmp_path, relative)


def test_a_path_through_a_symlink_is_refused_even_when_it_lands_inside(tmp_path):
    (tmp_path / "real" / "x").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    assert checked(tmp_path, "real/x") == Path(os.path.realpath(tmp_path)) / "real" / "x"
    with pytest.raises(NotFollowed, match="symlink"):
        checked(tmp_path, "alias/x")
