"""Collections: EMPIAR single-particle micrographs of different sizes and a movie entry, from a loopback EMPIAR
(FTP archive of real MRC files, REST API), and inbox folders of micrographs, become one OME-Zarr container each
in the bioformats2raw layout that ome-zarr-py's own reader lists and opens (every image's voxels, shape and
pixel size checked through it), with one valid catalog record listing the images. A volume entry (SBF-SEM
sections) and an inbox folder of TIFF slices stay one image; an uncalibrated section thickness is 'assumed'."""

from __future__ import annotations

import json
import logging
import urllib.parse
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr.utils import find_multiscales

from em_platform.catalog.db import CatalogDB
from em_platform.catalog.schema import validation_errors
from em_platform.formats.dm_writer import write_dm
from em_platform.ingest.local import ingest_entry
from em_platform.ingest.public import ingest_public_dataset
from em_platform.samples import em_texture
from em_platform.sources.empiar import DATASETS, EmpiarDataset, EmpiarEndpoints, EmpiarSource
from em_platform.storage import DataStore
from tests.support.public_apis import empiar_entry

LOG = logging.getLogger("tests.sources.collections")
DATA = "empiar/world_availability/{entry}/data"


def read_collection(root: str) -> list[dict]:
    """Every image of a bioformats2raw container, as ome-zarr-py reads it: name, axes, level-0 data, scale."""
    out = []
    for path, name, _ in find_multiscales(Path(root)):
        node = next(iter(Reader(parse_url(str(path)))()))
        multiscale = node.metadata
        axes = [a["name"] for a in multiscale["axes"]]
        scale = next(t["scale"] for t in multiscale["coordinateTransformations"][0] if t["type"] == "scale")
        units = {a["name"]: a.get("unit") for a in multiscale["axes"]}
        out.append(
            {
                "path": path,
                "name": name,
                "axes": axes,
                "data": np.asarray(node.data[0]),
                "scale": dict(zip(axes, scale, strict=True)),
            }
            | {"units": units}
        )
    return out


def _write_mrc(path: Path, data: np.ndarray, angstrom: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = angstrom


def _empiar(http_files, ftp_files, entry: str, **fields) -> EmpiarSource:
    http_files.add_json(f"/empiar/api/entry/{entry}/", empiar_entry(entry, **fields))
    endpoints = EmpiarEndpoints(
        api_url=http_files.url + "/empiar/api/entry/{entry_id}/",
        archive_ftp=ftp_files.url + "/empiar/world_availability/{entry_id}/data/",
        retry_attempts=2,
        retry_base_delay_s=0.01,
    )
    return EmpiarSource(
        EmpiarDataset(entry, fields["title"], fields["experiment_type"], fields["slices"]), endpoints
    )


def _ingest(source, tmp_path):
    db = CatalogDB(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    try:
        result = ingest_public_dataset(
            source,
            store=DataStore(str(tmp_path / "data")),
            catalog=db,
            downloads=tmp_path / "downloads",
            lineage={"run_id": "r", "asset_key": f"ingest/{source.name}", "partition_key": source.source_id},
            logger=LOG,
        )
        assert len(db.records()) == 1  # one record for the whole entry
    finally:
        db.dispose()
    assert validation_errors(result.record) == []
    return result


def test_micrographs_of_different_sizes_become_one_collection(tmp_path, http_files, ftp_files):
    rng = np.random.default_rng(3)
    micrographs = {
        "FoilHole_1_Data_1.mrc": rng.normal(0, 1, (96, 128)).astype(np.float32),
        "FoilHole_1_Data_2.mrc": rng.normal(0, 1, (80, 100)).astype(np.float32),
        "FoilHole_10_Data_1.mrc": rng.normal(0, 1, (96, 128)).astype(np.float32),
    }
    for name, image in micrographs.items():
        _write_mrc(ftp_files.root / DATA.format(entry="10001") / name, image, angstrom=1.06)
    source = _empiar(
        http_files,
        ftp_files,
        "10001",
        title="Apoferritin single particles",
        experiment_type="SPA",
        category="micrographs - single frame",
        directory="data",
        data_format="MRC",
        slices=3,
        shape_yx=(96, 128),
        pixel_nm=0.106,
    )
    result = _ingest(source, tmp_path)
    rec = result.record
    core, collection = rec["metadata"]["core"], rec["metadata"]["collection"]
    assert core["kind"] == "collection" and core["image_count"] == 3 and core["data_type"] == "float32"
    assert "volume_shape" not in core and "voxel_size_nm" not in core  # no made-up stack geometry
    assert "not sections of one block" in collection["rule"]
    order = ["FoilHole_1_Data_1.mrc", "FoilHole_1_Data_2.mrc", "FoilHole_10_Data_1.mrc"]  # natural order
    assert [im["name"] for im in collection["images"]] == order
    assert [im["shape"] for im in collection["images"]] == [[96, 128], [80, 100], [96, 128]]
    for im in collection["images"]:
        assert im["voxel_size_nm"] == pytest.approx({"y": 0.106, "x": 0.106})
        assert im["voxel_size_source"] == "header" and im["axes"] == ["y", "x"]
    assert rec["metadata"]["ome_zarr"]["layout"] == "bioformats2raw.layout"

    images = read_collection(result.volume_url)  # ome-zarr-py: series listed from the OME-XML
    assert [im["name"] for im in images] == order
    for im, name in zip(images, order, strict=True):
        np.testing.assert_array_equal(im["data"], micrographs[name])
        assert im["axes"] == ["y", "x"] and im["scale"] == pytest.approx({"y": 0.106, "x": 0.106})
        assert im["units"] == {"y": "nanometer", "x": "nanometer"}
    root = json.loads((Path(result.volume_url) / "zarr.json").read_text())
    assert root["attributes"]["ome"]["bioformats2raw.layout"] == 3
    ome = json.loads((Path(result.volume_url) / "OME" / "zarr.json").read_text())
    assert ome["attributes"]["ome"]["series"] == ["0", "1", "2"]

    # every image of the collection opens in Neuroglancer from the asset page: a link per row of its table
    from em_platform.assets.ingest_metadata import ingest_materialization_metadata
    from em_platform.assets.presentation import viewer_link
    from em_platform.resources import StorageResource

    storage = StorageResource(
        root_url=str(tmp_path / "data"),
        buffer_root=str(tmp_path / "b"),
        downloads_root=str(tmp_path / "d"),
        viewer_url="http://127.0.0.1:3030",
    )
    meta = ingest_materialization_metadata(result, lambda url: viewer_link(storage, url, LOG))
    table = urllib.parse.unquote(meta["collection"].value)
    key = Path(result.volume_url).relative_to(tmp_path / "data").as_posix()
    for series in ("0", "1", "2"):
        assert f"zarr3://http://127.0.0.1:3030/data/{key}/{series}/" in table, table
    assert f"/data/{key}/0/" in urllib.parse.unquote(meta["neuroglancer"].value)


def test_a_movie_entry_keeps_its_frames_as_time(tmp_path, http_files, ftp_files):
    rng = np.random.default_rng(4)
    movies = {f"movie_{i}.mrc": rng.integers(0, 4, (6, 64, 72), dtype=np.uint16) for i in (1, 2)}
    for name, frames in movies.items():
        _write_mrc(ftp_files.root / DATA.format(entry="10002") / name, frames, angstrom=0.85)
    source = _empiar(
        http_files,
        ftp_files,
        "10002",
        title="Movies of a membrane protein",
        experiment_type="SPA",
        category="micrographs - multiframe",
        frames_per_image=6,
        directory="data",
        data_format="MRC",
        slices=2,
        shape_yx=(64, 72),
        pixel_nm=0.085,
    )
    result = _ingest(source, tmp_path)
    images = result.record["metadata"]["collection"]["images"]
    assert [im["axes"] for im in images] == [["t", "y", "x"]] * 2
    assert [im["shape"] for im in images] == [[6, 64, 72]] * 2
    assert all(set(im["voxel_size_nm"]) == {"y", "x"} for im in images)  # frames have no thickness
    for im, name in zip(read_collection(result.volume_url), movies, strict=True):
        np.testing.assert_array_equal(im["data"], movies[name])
        assert im["axes"] == ["t", "y", "x"] and im["scale"]["x"] == pytest.approx(0.085)
        assert im["units"]["t"] is None


def test_a_volume_entry_stays_one_image_and_an_unrecorded_thickness_is_assumed(
    tmp_path, http_files, ftp_files
):
    stack = em_texture((3, 64, 80), seed=8, dtype=np.uint16)
    folder = ftp_files.root / DATA.format(entry="10003")
    folder.mkdir(parents=True)
    for i, section in enumerate(stack):
        write_dm(folder / f"slice_{i + 1}.dm3", section, version=3, scale=(6.0, 6.0), units=("nm", "nm"))
    source = _empiar(
        http_files,
        ftp_files,
        "10003",
        title="Serial block-face sections",
        experiment_type="SBF-SEM",
        directory="data",
        data_format="DM3",
        slices=3,
        shape_yx=(64, 80),
        pixel_nm=6.0,
    )
    assert source.dataset.section_thickness_nm is None and DATASETS["11759"].section_thickness_nm == 50.0
    rec = _ingest(source, tmp_path).record
    core = rec["metadata"]["core"]
    assert core.get("kind", "image") == "image" and core["volume_shape"] == [3, 64, 80]
    assert core["voxel_size_sources"] == {"z": "assumed", "y": "header", "x": "header"}
    assert core["voxel_size_source"] == "assumed"  # the weakest axis: nobody recorded the thickness
    assert core["voxel_size_nm"] == {"z": 6.0, "y": 6.0, "x": 6.0}


def _inbox_ingest(tmp_path, entry: Path):
    db = CatalogDB(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    try:
        result = ingest_entry(
            entry,
            entry.parent,
            store=DataStore(str(tmp_path / "data")),
            catalog=db,
            lineage={"run_id": "r", "asset_key": "ingest/local", "partition_key": entry.name},
            logger=LOG,
        )
    finally:
        db.dispose()
    assert validation_errors(result.record) == []
    return result


def test_inbox_folders_follow_the_same_rule(tmp_path):
    inbox = tmp_path / "inbox"
    micrographs = inbox / "session_7"  # MRC micrographs of two sizes
    a = em_texture((50, 60), seed=1, dtype=np.uint16)
    b = em_texture((40, 70), seed=2, dtype=np.uint16)
    _write_mrc(micrographs / "mic_2.mrc", a, angstrom=5.0)
    _write_mrc(micrographs / "mic_10.mrc", b, angstrom=5.0)
    result = _inbox_ingest(tmp_path, micrographs)
    images = read_collection(result.volume_url)
    assert [im["name"] for im in images] == ["mic_2.mrc", "mic_10.mrc"]
    np.testing.assert_array_equal(images[1]["data"], b)
    assert images[1]["scale"] == pytest.approx({"y": 0.5, "x": 0.5})
    assert [im["source_file"] for im in result.record["metadata"]["collection"]["images"]] == [
        "session_7/mic_2.mrc",
        "session_7/mic_10.mrc",
    ]

    slices = em_texture((3, 32, 40), seed=3, dtype=np.uint8)
    for name, folder in (("stack", inbox / "sections"), ("marked", inbox / "sections.collection")):
        folder.mkdir()
        for i, section in enumerate(slices):
            tifffile.imwrite(folder / f"s{i + 1}.tif", section)
        rec = _inbox_ingest(tmp_path, folder).record
        if name == "stack":  # TIFF slices of one size: one stack, as before
            assert rec["metadata"]["core"]["volume_shape"] == [3, 32, 40]
        else:  # the same slices in a folder named *.collection: one image each
            assert rec["metadata"]["core"]["image_count"] == 3
            assert [im["voxel_size_source"] for im in rec["metadata"]["collection"]["images"]] == [
                "assumed"
            ] * 3
