"""IDR against a loopback IDR-like JSON API and EBI-like FTP/HTTPS archive holding a real OME-TIFF."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from em_platform.formats import FormatError
from em_platform.samples import em_texture, write_ome_tiff
from em_platform.sources.idr import DATASETS, IdrEndpoints, make_source
from em_platform.sources.manifest import DownloadManifest
from em_platform.sources.retry import PermanentSourceError

LOG = logging.getLogger("tests.sources.idr")
KEY = "idr0086-9846137"
NAME = "Figure_S3B_FIB-SEM_U2OS.ome.tif"


def _image_json(shape, dtype="uint8", name=NAME):
    z, y, x = shape
    um = {"@type": "TBD#LengthI", "Unit": "MICROMETER", "Symbol": "µm"}
    return {
        "data": {
            "@id": 9846137,
            "@type": "http://www.openmicroscopy.org/Schemas/OME/2016-06#Image",
            "Name": name,
            "Pixels": {
                "@id": 9846137,
                "SizeX": x,
                "SizeY": y,
                "SizeZ": z,
                "SizeC": 1,
                "SizeT": 1,
                "PhysicalSizeX": {**um, "Value": 0.005},
                "PhysicalSizeY": {**um, "Value": 0.005},
                "PhysicalSizeZ": {**um, "Value": 0.01},
                "Type": {"@type": "TBD#PixelsTypeI", "value": dtype},
            },
        }
    }


@pytest.fixture
def idr(http_files, ftp_files):
    """The API on the HTTP server; the OME-TIFF in both the FTP archive and its HTTPS mirror."""
    vol = em_texture((6, 120, 150), seed=9, dtype=np.uint8)
    folder = DATASETS[KEY].archive_folder
    for root in (ftp_files.root, http_files.root):
        (root / "IDR" / folder).mkdir(parents=True)
        write_ome_tiff(root / "IDR" / folder / NAME, vol, {"z": 10.0, "y": 5.0, "x": 5.0})
    http_files.add_json("/api/v0/m/images/9846137/", _image_json(vol.shape))
    endpoints = IdrEndpoints(
        api_url=http_files.url + "/api/v0/m/images/{image_id}/",
        archive_ftp=ftp_files.url + "/IDR/",
        archive_https=http_files.url + "/IDR/",
        retry_attempts=2,
        retry_base_delay_s=0.01,
    )
    return vol, endpoints


def _fetch(source, tmp_path):
    version = source.check(LOG)
    manifest = DownloadManifest(tmp_path / "work", version.fingerprint)
    return version, source.fetch(manifest.folder, manifest, version, LOG)


def test_idr_over_ftp_equals_the_file_with_ome_physical_sizes(idr, tmp_path, ftp_files):
    vol, endpoints = idr
    version, fetched = _fetch(make_source(KEY, endpoints), tmp_path)
    np.testing.assert_array_equal(fetched.volume.data.compute(), vol)
    assert fetched.volume.voxel_size_nm() == {"z": 10.0, "y": 5.0, "x": 5.0}
    assert fetched.voxel_size_source == "header"
    assert fetched.files[0].url.startswith("ftp://") and fetched.files[0].path == NAME
    assert [p for p, _ in ftp_files.retr] == [f"IDR/{DATASETS[KEY].archive_folder}{NAME}"]
    assert version.description.startswith(NAME)


def test_ftp_missing_falls_back_to_https(idr, tmp_path, ftp_files, caplog):
    vol, endpoints = idr
    (ftp_files.root / "IDR" / DATASETS[KEY].archive_folder / NAME).unlink()
    with caplog.at_level("WARNING"):
        _, fetched = _fetch(make_source(KEY, endpoints), tmp_path)
    assert fetched.files[0].url.startswith("http://")
    np.testing.assert_array_equal(fetched.volume.data.compute(), vol)
    assert "FTP" in caplog.text


def test_a_file_that_is_not_the_image_the_api_describes_is_refused(idr, tmp_path, http_files):
    vol, endpoints = idr
    http_files.add_json("/api/v0/m/images/9846137/", _image_json((7, 120, 150)))
    with pytest.raises(FormatError, match=r"shape z,y,x \(6, 120, 150\) but the API says \(7, 120, 150\)"):
        _fetch(make_source(KEY, endpoints), tmp_path)


def test_an_unknown_image_is_a_404_naming_the_api_url(idr, tmp_path):
    _, endpoints = idr
    source = make_source(KEY, endpoints)
    source.api_url = source.api_url.replace("9846137", "1")
    with pytest.raises(PermanentSourceError, match="404") as err:
        source.check(LOG)
    assert source.api_url in str(err.value)


def test_bad_endpoints_name_the_field():
    with pytest.raises(ValueError, match="archive_ftp"):
        IdrEndpoints(archive_ftp="https://ftp.ebi.ac.uk/pub/databases/IDR/").validate()
    with pytest.raises(ValueError, match="image_id"):
        IdrEndpoints(api_url="https://idr.openmicroscopy.org/api/v0/m/images/").validate()
    IdrEndpoints().validate()
