"""EMPIAR and IDR through the whole public-ingest pipeline into one catalog: each ends as OME-Zarr equal to
the source voxels with a valid complete record; a corrupt EMPIAR section fails that dataset only (IDR goes
on), publishes nothing, and the run after the archive is repaired completes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import zarr

from em_platform.catalog.db import CatalogDB
from em_platform.catalog.schema import validation_errors
from em_platform.formats.dm_writer import write_dm
from em_platform.ingest.public import PublicIngestError, ingest_public_dataset
from em_platform.samples import em_texture, write_ome_tiff
from em_platform.sources import empiar, idr
from em_platform.storage import DataStore
from tests.support.public_apis import empiar_entry, idr_image

LOG = logging.getLogger("tests.sources.public_ingest")
DATA = "empiar/world_availability/11759/data"
IMAGE = idr.DATASETS["idr0086-9846137"]


@pytest.fixture
def archive(http_files, ftp_files):
    sections = em_texture((4, 128, 160), seed=6, dtype=np.uint16)
    names = [f"retina_s{i + 1}.dm3" for i in range(len(sections))]
    (ftp_files.root / DATA).mkdir(parents=True)
    for name, sec in zip(names, sections, strict=True):
        write_dm(ftp_files.root / DATA / name, sec, version=3, scale=(8.0, 8.0), units=("nm", "nm"))
    http_files.add_json(
        "/empiar/api/entry/11759/",
        empiar_entry(
            "11759",
            title="Developing retina in zebrafish 55 hpf larval eye",
            experiment_type="SBF-SEM",
            directory="data",
            data_format="DM3",
            slices=4,
            shape_yx=(128, 160),
            pixel_nm=8.0,
        ),
    )
    image = em_texture((5, 90, 110), seed=7, dtype=np.uint8)
    path = ftp_files.root / "IDR" / IMAGE.archive_folder / IMAGE.file_name
    path.parent.mkdir(parents=True)
    write_ome_tiff(path, image, {"z": 20.0, "y": 20.0, "x": 20.0})
    http_files.add_json("/api/v0/m/images/9846137/", idr_image(9846137, IMAGE.title, image.shape))
    sources = {
        "empiar": empiar.make_source(
            "11759",
            empiar.EmpiarEndpoints(
                api_url=http_files.url + "/empiar/api/entry/{entry_id}/",
                archive_ftp=ftp_files.url + "/empiar/world_availability/{entry_id}/data/",
                retry_attempts=2,
                retry_base_delay_s=0.01,
            ),
        ),
        "idr": idr.make_source(
            "idr0086-9846137",
            idr.IdrEndpoints(
                api_url=http_files.url + "/api/v0/m/images/{image_id}/",
                archive_ftp=ftp_files.url + "/IDR/",
                archive_https=http_files.url + "/IDR/",
                retry_attempts=2,
                retry_base_delay_s=0.01,
            ),
        ),
    }
    return sources, sections, names, image


def test_a_corrupt_section_fails_its_dataset_only_and_a_repaired_archive_completes(
    archive, tmp_path, ftp_files
):
    sources, sections, names, image = archive
    store = DataStore(str(tmp_path / "data"))
    db = CatalogDB(f"sqlite:///{tmp_path / 'catalog.sqlite'}")

    def ingest(name):
        lineage = {"run_id": f"run-{name}", "asset_key": f"ingest/{name}", "partition_key": name}
        return ingest_public_dataset(
            sources[name],
            store=store,
            catalog=db,
            downloads=tmp_path / "downloads",
            lineage=lineage,
            logger=LOG,
        )

    bad = ftp_files.root / DATA / names[2]
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[: len(good_bytes) // 3])  # truncated in the archive
    with pytest.raises(PublicIngestError, match=names[2]):
        ingest("empiar")
    failed = db.find("empiar", "11759")
    assert failed["status"] == "failed" and names[2] in failed["error"]["message"]
    assert not store.exists(store.path("ingest", "empiar", "11759.ome.zarr"))

    result = ingest("idr")  # another dataset is not affected
    np.testing.assert_array_equal(zarr.open_group(result.volume_url, mode="r")["0"][...], image)
    assert result.record["metadata"]["core"]["voxel_size_nm"] == {"z": 20.0, "y": 20.0, "x": 20.0}

    bad.write_bytes(good_bytes)  # the archive is repaired
    result = ingest("empiar")
    np.testing.assert_array_equal(zarr.open_group(result.volume_url, mode="r")["0"][...], sections)
    rec = result.record
    assert rec["status"] == "complete" and rec["error"]["retry_count"] == 1
    assert [f["path"] for f in rec["files"]["source"]] == names
    assert rec["metadata"]["core"]["voxel_size_nm"] == {"z": 50.0, "y": 8.0, "x": 8.0}
    for record in db.records():
        assert validation_errors(record) == []
    db.dispose()
