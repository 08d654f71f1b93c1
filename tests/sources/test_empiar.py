"""EMPIAR against a loopback EMPIAR-like REST API and an EBI-like archive (FTP, and HTTPS with an index page)
holding real DM3 sections written by the repository's DM writer."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest

from em_platform.formats import FormatError
from em_platform.formats.dm_writer import write_dm
from em_platform.samples import em_texture
from em_platform.sources.empiar import EmpiarEndpoints, make_source
from em_platform.sources.manifest import DownloadManifest
from em_platform.sources.retry import PermanentSourceError
from tests.support.http_files import apache_index

LOG = logging.getLogger("tests.sources.empiar")
FOLDER = "empiar/world_availability/11759/data"
ENTRY = {
    "EMPIAR-11759": {
        "title": "Developing retina in zebrafish 55 hpf larval eye",
        "release_date": "2023-11-01",
        "experiment_type": "SBF-SEM",
        "imagesets": [
            {
                "name": "SBF-SEM sections",
                "directory": "/data",
                "category": "SBF-SEM",
                "header_format": "DM3",
                "data_format": "DM3",
                "num_images_or_tilt_series": 11,
                "image_width": 300,
                "image_height": 256,
                "pixel_width": 80.0,
                "pixel_height": 80.0,
            }
        ],
        "dataset_size": "1.2 GB",
    }
}


@pytest.fixture
def archive(http_files, ftp_files):
    """11 DM3 sections named so that plain sorting would misorder them (s2 before s10)."""
    sections = em_texture((11, 256, 300), seed=4, dtype=np.uint16)
    names = [f"section_s{i + 1}.dm3" for i in range(len(sections))]
    for root in (ftp_files.root, http_files.root):
        (root / FOLDER).mkdir(parents=True)
        for name, sec in zip(names, sections, strict=True):
            write_dm(root / FOLDER / name, sec, version=3, scale=(8.0, 8.0), units=("nm", "nm"))
    listing = [(n, (http_files.root / FOLDER / n).stat().st_size) for n in names]
    random.Random(1).shuffle(listing)  # the index page's order must not matter
    http_files.add_html(f"/{FOLDER}/", apache_index(listing))
    http_files.add_json("/empiar/api/entry/11759/", ENTRY)
    return sections, names


def _endpoints(http_files, ftp_files, transport):
    return EmpiarEndpoints(
        api_url=http_files.url + "/empiar/api/entry/{entry_id}/",
        archive_ftp=ftp_files.url + "/empiar/world_availability/{entry_id}/data/",
        archive_https=http_files.url + "/empiar/world_availability/{entry_id}/data/",
        transport=transport,
        parallel=3,
        retry_attempts=2,
        retry_base_delay_s=0.01,
    )


def _fetch(source, tmp_path):
    version = source.check(LOG)
    manifest = DownloadManifest(tmp_path / "work", version.fingerprint)
    return version, manifest, source.fetch(manifest.folder, manifest, version, LOG)


@pytest.mark.parametrize("transport", ["ftp", "https"])
def test_sections_become_one_volume_in_slice_order(archive, tmp_path, http_files, ftp_files, transport):
    sections, names = archive
    version, _, fetched = _fetch(make_source("11759", _endpoints(http_files, ftp_files, transport)), tmp_path)
    np.testing.assert_array_equal(fetched.volume.data.compute(), sections)
    assert fetched.volume.axes == ("z", "y", "x") and fetched.volume.data.dtype == np.uint16
    assert fetched.volume.voxel_size_nm() == {"z": 50.0, "y": 8.0, "x": 8.0}
    assert fetched.voxel_size_source == "source"  # z is the entry's published section thickness
    assert [f.path for f in fetched.files] == names
    assert version.description == "Developing retina in zebrafish 55 hpf larval eye"
    assert version.additional_metadata["empiar_entry"]["experiment_type"] == "SBF-SEM"


def test_a_rerun_fetches_no_finished_file(archive, tmp_path, http_files, ftp_files):
    source = make_source("11759", _endpoints(http_files, ftp_files, "https"))
    _, manifest, _ = _fetch(source, tmp_path)
    gets = [r for r in http_files.log if r.method == "GET" and r.path.endswith(".dm3")]
    assert len(gets) == 11
    version = source.check(LOG)
    source.fetch(manifest.folder, DownloadManifest(manifest.folder, version.fingerprint), version, LOG)
    assert len([r for r in http_files.log if r.method == "GET" and r.path.endswith(".dm3")]) == 11


def test_a_corrupt_section_is_named(archive, tmp_path, http_files, ftp_files):
    _, names = archive
    bad = ftp_files.root / FOLDER / names[4]
    bad.write_bytes(bad.read_bytes()[:5000])
    with pytest.raises(FormatError, match=names[4]):
        _fetch(make_source("11759", _endpoints(http_files, ftp_files, "ftp")), tmp_path)


def test_sections_of_different_sizes_are_refused(archive, tmp_path, http_files, ftp_files):
    _, names = archive
    write_dm(ftp_files.root / FOLDER / names[2], np.zeros((10, 10), np.uint16), version=3)
    with pytest.raises(FormatError, match=f"{names[2]}.*does not match the first slice"):
        _fetch(make_source("11759", _endpoints(http_files, ftp_files, "ftp")), tmp_path)


def test_an_unknown_entry_is_a_404_naming_the_api_url(archive, http_files, ftp_files):
    source = make_source("11759", _endpoints(http_files, ftp_files, "ftp"))
    source.api_url = source.api_url.replace("11759", "99999")
    with pytest.raises(PermanentSourceError, match="404") as err:
        source.check(LOG)
    assert source.api_url in str(err.value)


def test_bad_endpoints_name_the_field():
    with pytest.raises(ValueError, match="transport"):
        EmpiarEndpoints(transport="rsync").validate()
    with pytest.raises(ValueError, match="archive_ftp"):
        EmpiarEndpoints(archive_ftp="ftp://ftp.ebi.ac.uk/empiar/world_availability/data/").validate()
    EmpiarEndpoints().validate()
