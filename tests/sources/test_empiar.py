"""EMPIAR against a loopback EMPIAR-like REST API and an EBI-like archive (FTP via pyftpdlib, and HTTP with
an Apache index page) holding real DM3 sections written by the repository's DM writer, or an MRC block."""

from __future__ import annotations

import logging
import random

import mrcfile
import numpy as np
import pytest

from em_platform.formats import FormatError
from em_platform.formats.dm_writer import write_dm
from em_platform.samples import em_texture
from em_platform.sources.dataset import FetchedCollection, FetchedVolume
from em_platform.sources.empiar import EmpiarEndpoints, make_source, modality_of
from em_platform.sources.manifest import DownloadManifest
from em_platform.sources.retry import PermanentSourceError
from tests.support.http_files import apache_index
from tests.support.public_apis import empiar_entry

LOG = logging.getLogger("tests.sources.empiar")
TITLE = "Developing retina in zebrafish 55 hpf larval eye"
DATA = "empiar/world_availability/11759/data"
API = "/empiar/api/entry/11759/"
# Lexical order would be slice_10, slice_11, slice_2: only a natural sort gets the sections right.
NAMES = ["F57-8_slice_2.dm3", "F57-8_slice_10.dm3", "F57-8_slice_11.dm3"]


def _publish(http_files, ftp_files, folder: str, files: dict[str, np.ndarray], **dm_kw) -> None:
    """Write the sections as DM3 into both archives and the HTTP index page, listed in shuffled order."""
    for root in (ftp_files.root, http_files.root):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, section in files.items():
            write_dm(root / folder / name, section, version=3, **dm_kw)
    listing = [(n, (http_files.root / folder / n).stat().st_size) for n in files]
    random.Random(7).shuffle(listing)
    http_files.add_html(f"/{folder}/", apache_index(listing))


@pytest.fixture
def sections(http_files, ftp_files):
    stack = em_texture((3, 256, 300), seed=4, dtype=np.uint16)
    _publish(
        http_files,
        ftp_files,
        DATA,
        dict(zip(NAMES, stack, strict=True)),
        scale=(8.0, 8.0),
        units=("nm", "nm"),
    )
    _serve_entry(http_files)
    return stack


def _serve_entry(http_files, **changes) -> None:
    fields = dict(
        title=TITLE,
        experiment_type="SBF-SEM",
        directory="data",
        data_format="DM3",
        slices=3,
        shape_yx=(256, 300),
        pixel_nm=8.0,
    )
    http_files.add_json(API, empiar_entry("11759", **{**fields, **changes}))


def _endpoints(http_files, ftp_files, transport: str) -> EmpiarEndpoints:
    return EmpiarEndpoints(
        api_url=http_files.url + "/empiar/api/entry/{entry_id}/",
        archive_ftp=ftp_files.url + "/empiar/world_availability/{entry_id}/data/",
        archive_https=http_files.url + "/empiar/world_availability/{entry_id}/data/",
        transport=transport,
        parallel=3,
        retry_attempts=2,
        retry_base_delay_s=0.01,
    )


def _section_gets(http_files) -> list:
    return [r for r in http_files.log if r.method == "GET" and r.path.endswith(".dm3")]


def _ingest(source, tmp_path):
    version = source.check(LOG)
    manifest = DownloadManifest(tmp_path / "work", version.fingerprint)
    return version, manifest, source.fetch(manifest.folder, manifest, version, LOG)


@pytest.mark.parametrize("transport", ["ftp", "https"])
def test_sections_become_one_volume_in_slice_order(sections, tmp_path, http_files, ftp_files, transport):
    source = make_source("11759", _endpoints(http_files, ftp_files, transport))
    version, _, fetched = _ingest(source, tmp_path)

    assert isinstance(fetched, FetchedVolume)  # SBF-SEM sections of one size: a volume, not a collection
    np.testing.assert_array_equal(fetched.volume.data.compute(), sections)
    assert fetched.volume.axes == ("z", "y", "x") and fetched.volume.data.dtype == np.uint16
    assert fetched.volume.voxel_size_nm() == {"z": 50.0, "y": 8.0, "x": 8.0}
    # x, y from the DM3 calibration; z (section thickness) is the entry's published value
    assert fetched.axis_sources() == {"z": "source", "y": "header", "x": "header"}
    assert fetched.modality == "SEM"
    assert [f.path for f in fetched.files] == NAMES
    assert all(f.url.startswith("ftp://" if transport == "ftp" else "http://") for f in fetched.files)
    assert version.description == TITLE
    assert version.additional_metadata["EMPIAR-11759"]["experiment_type"] == "SBF-SEM"
    assert version.total_bytes == sum(f.size_bytes for f in fetched.files)
    assert source.check(LOG).fingerprint == version.fingerprint  # stable while nothing changes


def test_a_rerun_fetches_nothing_and_a_changed_file_changes_the_fingerprint(
    sections, tmp_path, http_files, ftp_files
):
    source = make_source("11759", _endpoints(http_files, ftp_files, "https"))
    version, manifest, _ = _ingest(source, tmp_path)
    assert len(_section_gets(http_files)) == 3

    again = source.check(LOG)
    assert again.fingerprint == version.fingerprint
    fetched = source.fetch(manifest.folder, DownloadManifest(manifest.folder, again.fingerprint), again, LOG)
    assert len(_section_gets(http_files)) == 3  # nothing fetched again
    np.testing.assert_array_equal(fetched.volume.data.compute(), sections)

    write_dm(http_files.root / DATA / NAMES[1], sections[1][:128], version=3)
    assert source.check(LOG).fingerprint != version.fingerprint


def test_a_rerun_over_ftp_retrieves_nothing(sections, tmp_path, http_files, ftp_files):
    source = make_source("11759", _endpoints(http_files, ftp_files, "ftp"))
    version, manifest, _ = _ingest(source, tmp_path)
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in ftp_files.retr) == sorted(NAMES)
    source.fetch(manifest.folder, DownloadManifest(manifest.folder, version.fingerprint), version, LOG)
    assert len(ftp_files.retr) == 3


@pytest.mark.parametrize("damage", ["truncated", "not a DM file"])
def test_a_damaged_section_is_named(sections, tmp_path, http_files, ftp_files, damage):
    bad = ftp_files.root / DATA / NAMES[1]
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"<html>gateway timeout</html>" * 50)
    with pytest.raises(FormatError, match=NAMES[1]):
        _ingest(make_source("11759", _endpoints(http_files, ftp_files, "ftp")), tmp_path)


def test_sections_of_different_sizes_become_a_collection_naming_the_odd_one(
    sections, tmp_path, http_files, ftp_files
):
    small = np.arange(100, dtype=np.uint16).reshape(10, 10)
    write_dm(ftp_files.root / DATA / NAMES[2], small, version=3, scale=(8.0, 8.0), units=("nm", "nm"))
    _, _, fetched = _ingest(make_source("11759", _endpoints(http_files, ftp_files, "ftp")), tmp_path)
    assert isinstance(fetched, FetchedCollection)
    assert f"{NAMES[2]} is 10x10 uint16 where {NAMES[0]} is 256x300 uint16" in fetched.rule
    assert [im.name for im in fetched.images] == NAMES
    np.testing.assert_array_equal(fetched.images[2].volume.data.compute(), small)
    np.testing.assert_array_equal(fetched.images[0].volume.data.compute(), sections[0])


def test_uncalibrated_sections_take_the_entry_pixel_size(tmp_path, http_files, ftp_files):
    stack = em_texture((2, 64, 80), seed=5, dtype=np.uint8)
    _publish(http_files, ftp_files, DATA, {"s1.dm3": stack[0], "s2.dm3": stack[1]})  # no calibration
    _serve_entry(http_files, slices=2, shape_yx=(64, 80), pixel_nm=7.0)
    _, _, fetched = _ingest(make_source("11759", _endpoints(http_files, ftp_files, "https")), tmp_path)
    assert fetched.volume.voxel_size_nm() == {"z": 50.0, "y": 7.0, "x": 7.0}
    assert fetched.axis_sources() == {"z": "source", "y": "source", "x": "source"}


def test_an_mrc_block_in_the_imageset_folder(tmp_path, http_files, ftp_files):
    """A FIB-SEM entry whose data/ holds only the imageset's folder, with one calibrated 3-D MRC."""
    block = em_texture((4, 40, 50), seed=6, dtype=np.uint8).astype(np.int8)
    folder = ftp_files.root / DATA / "FIB-SEM stack"
    folder.mkdir(parents=True)
    with mrcfile.new(folder / "cell_1.mrc") as mrc:
        mrc.set_data(block)
        mrc.voxel_size = (30.0, 40.0, 50.0)  # x, y, z in Å
    _serve_entry(
        http_files,
        title="HeLa by FIB-SEM",
        experiment_type="FIB-SEM",
        directory="data/FIB-SEM stack",
        data_format="MRC",
        slices=1,
        shape_yx=(40, 50),
        pixel_nm=None,
    )
    version, _, fetched = _ingest(make_source("11759", _endpoints(http_files, ftp_files, "ftp")), tmp_path)
    np.testing.assert_array_equal(fetched.volume.data.compute(), block)
    assert fetched.volume.voxel_size_nm() == pytest.approx({"z": 5.0, "y": 4.0, "x": 3.0})
    assert fetched.axis_sources() == {"z": "header", "y": "header", "x": "header"}
    assert fetched.modality == "FIB-SEM"
    assert [f.path for f in fetched.files] == ["FIB-SEM stack/cell_1.mrc"]
    assert version.description == "HeLa by FIB-SEM"


def test_an_unknown_entry_is_a_404_naming_the_api_url(tmp_path, http_files, ftp_files):
    source = make_source("11759", _endpoints(http_files, ftp_files, "ftp"))  # no entry JSON served
    with pytest.raises(PermanentSourceError, match="404") as err:
        source.check(LOG)
    assert http_files.url + API in str(err.value)


def test_an_empty_archive_folder_is_named(tmp_path, http_files, ftp_files):
    (ftp_files.root / DATA).mkdir(parents=True)
    (ftp_files.root / DATA / "README.txt").write_text("nothing here")
    _serve_entry(http_files, slices=16, shape_yx=(5632, 5628))
    with pytest.raises(PermanentSourceError, match="no image files") as err:
        make_source("11759", _endpoints(http_files, ftp_files, "ftp")).check(LOG)
    assert ftp_files.url in str(err.value)


def test_endpoints_and_datasets():
    EmpiarEndpoints().validate()
    with pytest.raises(ValueError, match="transport"):
        EmpiarEndpoints(transport="rsync").validate()
    with pytest.raises(ValueError, match="archive_ftp"):
        EmpiarEndpoints(archive_ftp="ftp://ftp.ebi.ac.uk/empiar/world_availability/data/").validate()
    with pytest.raises(ValueError, match="api_url"):
        EmpiarEndpoints(api_url="ftp://www.ebi.ac.uk/empiar/api/entry/{entry_id}/").validate()
    with pytest.raises(ValueError, match="parallel"):
        EmpiarEndpoints(parallel=0).validate()
    with pytest.raises(ValueError, match="unknown EMPIAR entry '10000'"):
        make_source("10000")
    source = make_source("11759")
    assert (source.name, source.source_id) == ("empiar", "11759")
    assert source.archive_url == "ftp://ftp.ebi.ac.uk/empiar/world_availability/11759/data/"
    assert source.api_url == "https://www.ebi.ac.uk/empiar/api/entry/11759/"
    assert [modality_of(t) for t in ("SBF-SEM", "FIB-SEM", "cryo-ET", None)] == ["SEM", "FIB-SEM", "EM", "EM"]
