"""archive_montage: a killed upload leaves a failed record; the re-run resumes and completes it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from em_platform.catalog.db import CatalogDB
from em_platform.catalog.schema import validate_record
from em_platform.imaging.ome_zarr import write_ome_zarr
from em_platform.simulation.scope import simulate_montage
from em_platform.simulation.scope_config import ScopeConfig
from em_platform.tem.archive import archive_montage
from em_platform.tem.journal import Journal
from em_platform.tem.tile_records import TileRecords


class Killed(RuntimeError):
    pass


@pytest.fixture
def montage(tmp_path):
    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    journal = Journal(url)
    cfg = ScopeConfig(
        rows=1, columns=2, tile_size=64, overlap=0.25, jitter_px=2.0, brightfield_frames=0, darkfield_frames=0
    )
    truth = simulate_montage(cfg, tmp_path / "tiles", journal.record, sleep=lambda s: None)
    buffer = tmp_path / "buffer" / truth.montage_id
    (buffer / "processed_tiles.zarr").mkdir(parents=True)
    for i in range(3):
        (buffer / "processed_tiles.zarr" / f"chunk{i}").write_bytes(bytes([i]) * 1000)
    info = write_ome_zarr(
        np.arange(64 * 96, dtype=np.uint8).reshape(64, 96),
        str(buffer / "montage.ome.zarr"),
        axes=("y", "x"),
        scale=(4.0, 4.0),
        units=("nanometer", "nanometer"),
    )
    (buffer / "montage.json").write_text(json.dumps({**info.to_dict(), "shape": [64, 96]}))
    (buffer / "layout.json").write_text(json.dumps({"qc": {"edges": 1}}))
    return journal, truth, buffer, url


def _archive(journal, truth, buffer, url, dest, **kw):
    return archive_montage(
        journal.montage(truth.montage_id),
        journal.tiles(truth.montage_id),
        buffer,
        str(dest),
        catalog=CatalogDB(url),
        tile_records=TileRecords(url),
        qc={"status": "GOOD"},
        pixel_size_nm=4.0,
        pixel_size_source="header",
        lineage={"run_id": "test-run", "asset_key": "montage_upload", "partition_key": truth.montage_id},
        **kw,
    )


def test_a_killed_upload_fails_the_record_and_the_rerun_resumes(montage, tmp_path):
    journal, truth, buffer, url = montage
    dest = tmp_path / "store" / truth.montage_id

    def kill_after_two(progress):
        if progress.objects_done >= 2:
            raise Killed("network gone")

    with pytest.raises(Killed):
        _archive(journal, truth, buffer, url, dest, on_progress=kill_after_two)
    record = CatalogDB(url).find("acquisition", truth.montage_id)
    assert record["status"] == "failed" and "network gone" in record["error"]["message"]
    assert TileRecords(url).montage_tiles(truth.montage_id) == []  # nothing recorded for a half upload
    assert any(buffer.rglob("*"))  # the buffer is kept

    result = _archive(journal, truth, buffer, url, dest)
    assert result.upload.skipped and len(result.upload.sent) == result.upload.objects - len(
        result.upload.skipped
    )
    assert result.record["status"] == "complete"
    history = [h.to_status for h in CatalogDB(url).history(result.record["id"])]
    assert history.count("failed") == 1 and history[-1] == "complete"
    validate_record(result.record)
    assert result.tile_records == 2 and result.freed_bytes > 0
    assert not [p for p in buffer.rglob("*") if p.is_file()]
    assert (dest / "montage.ome.zarr" / "zarr.json").is_file()
    meta = json.loads((dest / "metadata.json").read_text())
    assert meta["fused"]["url"] == f"{dest}/montage.ome.zarr"


def test_missing_buffer_content_is_named_before_anything_is_recorded(montage, tmp_path):
    journal, truth, buffer, url = montage
    (buffer / "layout.json").unlink()
    with pytest.raises(FileNotFoundError, match="layout.json.*montage_layout"):
        _archive(journal, truth, buffer, url, tmp_path / "store")
    assert CatalogDB(url).find("acquisition", truth.montage_id) is None
