"""IDR against a loopback OMERO-JSON-like API and an EBI-like archive (FTP via pyftpdlib, and HTTP) holding a
real OME-TIFF written by tifffile."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tifffile

from em_platform.formats import FormatError
from em_platform.samples import em_texture, write_ome_tiff
from em_platform.sources.idr import DATASETS, IdrEndpoints, make_source
from em_platform.sources.manifest import DownloadManifest
from em_platform.sources.retry import PermanentSourceError
from tests.support.public_apis import idr_image

LOG = logging.getLogger("tests.sources.idr")
KEY = "idr0086-9846137"
IMAGE = DATASETS[KEY]
FILE = f"IDR/{IMAGE.archive_folder.strip('/')}/{IMAGE.file_name}"
API = "/api/v0/m/images/9846137/"
SHAPE = (6, 120, 150)


@pytest.fixture
def volume(http_files, ftp_files):
    """The API on the HTTP server; the OME-TIFF (physical sizes in nm) in the FTP archive and its mirror."""
    vol = em_texture(SHAPE, seed=9, dtype=np.uint8)
    for root in (ftp_files.root, http_files.root):
        (root / FILE).parent.mkdir(parents=True)
        write_ome_tiff(root / FILE, vol, {"z": 10.0, "y": 5.0, "x": 5.0})
    http_files.add_json(API, idr_image(9846137, IMAGE.title, SHAPE, physical_um=(0.01, 0.005, 0.005)))
    return vol


def _endpoints(http_files, ftp_files) -> IdrEndpoints:
    return IdrEndpoints(
        api_url=http_files.url + "/api/v0/m/images/{image_id}/",
        archive_ftp=ftp_files.url + "/IDR/",
        archive_https=http_files.url + "/IDR/",
        retry_attempts=2,
        retry_base_delay_s=0.01,
    )


def _ingest(source, tmp_path):
    version = source.check(LOG)
    manifest = DownloadManifest(tmp_path / "work", version.fingerprint)
    return version, manifest, source.fetch(manifest.folder, manifest, version, LOG)


def test_idr_over_ftp_equals_the_file_with_ome_physical_sizes(volume, tmp_path, http_files, ftp_files):
    version, _, fetched = _ingest(make_source(KEY, _endpoints(http_files, ftp_files)), tmp_path)
    np.testing.assert_array_equal(fetched.volume.data.compute(), volume)
    assert fetched.volume.voxel_size_nm() == {"z": 10.0, "y": 5.0, "x": 5.0}
    assert fetched.voxel_size_source == "header"
    assert fetched.modality == "FIB-SEM"
    assert fetched.files[0].path == IMAGE.file_name and fetched.files[0].url.startswith("ftp://")
    assert [p for p, _ in ftp_files.retr] == [FILE]
    assert not [r for r in http_files.log if r.path.endswith(".tif")]  # the mirror was not touched
    assert version.description.startswith(IMAGE.title)
    assert version.total_bytes == fetched.files[0].size_bytes
    assert version.additional_metadata["idr_image"]["Pixels"]["SizeZ"] == SHAPE[0]


def test_ftp_missing_falls_back_to_https_and_a_rerun_fetches_nothing(
    volume, tmp_path, http_files, ftp_files, caplog
):
    (ftp_files.root / FILE).unlink()
    source = make_source(KEY, _endpoints(http_files, ftp_files))
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        version, manifest, fetched = _ingest(source, tmp_path)
    assert fetched.files[0].url == http_files.url_for(FILE)
    np.testing.assert_array_equal(fetched.volume.data.compute(), volume)
    assert "FTP" in caplog.text and "550" in caplog.text  # why it switched

    # FTP is back for the re-run: the file finished over HTTPS is still not fetched again.
    write_ome_tiff(ftp_files.root / FILE, volume, {"z": 10.0, "y": 5.0, "x": 5.0})
    gets = len([r for r in http_files.log if r.method == "GET" and r.path.endswith(".tif")])
    retr = len(ftp_files.retr)
    source.fetch(manifest.folder, DownloadManifest(manifest.folder, version.fingerprint), version, LOG)
    assert len([r for r in http_files.log if r.method == "GET" and r.path.endswith(".tif")]) == gets
    assert len(ftp_files.retr) == retr


@pytest.mark.parametrize(
    ("api_shape", "api_dtype", "message"),
    [
        (
            (7, 120, 150),
            "uint8",
            r"shape t,c,z,y,x \(1, 1, 6, 120, 150\) but the API says \(1, 1, 7, 120, 150\)",
        ),
        (SHAPE, "uint16", "pixel type uint8 but the API says uint16"),
    ],
)
def test_a_file_that_is_not_the_image_the_api_describes_is_refused(
    volume, tmp_path, http_files, ftp_files, api_shape, api_dtype, message
):
    http_files.add_json(API, idr_image(9846137, IMAGE.title, api_shape, dtype=api_dtype))
    with pytest.raises(FormatError, match=message) as err:
        _ingest(make_source(KEY, _endpoints(http_files, ftp_files)), tmp_path)
    assert IMAGE.file_name in str(err.value) and API in str(err.value)


def test_a_plain_tiff_takes_the_api_physical_sizes(volume, tmp_path, http_files, ftp_files):
    tifffile.imwrite(ftp_files.root / FILE, volume, photometric="minisblack")  # no OME-XML, no resolution
    _, _, fetched = _ingest(make_source(KEY, _endpoints(http_files, ftp_files)), tmp_path)
    np.testing.assert_array_equal(fetched.volume.data.compute(), volume)
    assert fetched.volume.voxel_size_nm() == pytest.approx({"z": 10.0, "y": 5.0, "x": 5.0})
    assert fetched.voxel_size_source == "source"


def test_an_unknown_image_is_a_404_naming_the_api_url(tmp_path, http_files, ftp_files):
    source = make_source(KEY, _endpoints(http_files, ftp_files))  # no image JSON served
    with pytest.raises(PermanentSourceError, match="404") as err:
        source.check(LOG)
    assert http_files.url + API in str(err.value)


def test_endpoints_and_datasets():
    IdrEndpoints().validate()
    with pytest.raises(ValueError, match="archive_ftp"):
        IdrEndpoints(archive_ftp="https://ftp.ebi.ac.uk/pub/databases/IDR/").validate()
    with pytest.raises(ValueError, match="image_id"):
        IdrEndpoints(api_url="https://idr.openmicroscopy.org/api/v0/m/images/").validate()
    with pytest.raises(ValueError, match="unknown IDR dataset"):
        make_source("idr0001-1")
    source = make_source(KEY)
    assert (source.name, source.source_id) == ("idr", "IDR-9846137")
    assert source.api_url == "https://idr.openmicroscopy.org/api/v0/m/images/9846137/"
    assert source.ftp_url == (
        "ftp://ftp.ebi.ac.uk/pub/databases/IDR/idr0086-miron-micrographs/20200610-ftp/experimentD/"
        "Miron_FIB-SEM/Miron_FIB-SEM_processed/Figure_S3B_FIB-SEM_U2OS_20x20x20nm_xy.tif"
    )
    assert IMAGE.shape_zyx == (184, 775, 1121)
