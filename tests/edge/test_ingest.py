"""A public source's listing is outside input too: a file name that climbs out of the download folder
(percent-encoded past the index parser's '../' filter) is refused before anything is written."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from em_platform.formats.dm_writer import write_dm
from em_platform.sources.empiar import EmpiarEndpoints, make_source
from em_platform.sources.manifest import DownloadManifest
from tests.support.http_files import HttpFileServer
from tests.support.public_apis import empiar_entry

LOG = logging.getLogger("tests.edge.ingest")
DATA = "empiar/world_availability/11759/data"


@pytest.fixture
def http_files(tmp_path):
    (tmp_path / "http").mkdir()
    with HttpFileServer(tmp_path / "http") as server:
        yield server


def test_empiar_listing_cannot_write_outside_the_download_folder(tmp_path, http_files):
    root = http_files.root
    (root / DATA).mkdir(parents=True)
    section = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    write_dm(root / DATA / "slice_1.dm3", section, version=3)
    write_dm(root / "evil.dm3", section, version=3)  # where DATA/../../../../evil.dm3 lands on the server
    size = (root / "evil.dm3").stat().st_size
    hostile = "%2e%2e/%2e%2e/%2e%2e/%2e%2e/evil.dm3"  # unquoted after the parser's '../' check
    http_files.add_html(
        f"/{DATA}/",
        f'<html><body><a href="slice_1.dm3">slice_1.dm3</a> {size}<br><a href="{hostile}">x</a> {size}</body></html>',
    )
    http_files.add_json(
        "/empiar/api/entry/11759/",
        empiar_entry("11759", title="t", experiment_type="SBF-SEM", directory="data", data_format="DM3",
                     slices=2, shape_yx=(64, 64), pixel_nm=8.0),
    )  # fmt: skip
    source = make_source(
        "11759",
        EmpiarEndpoints(
            api_url=http_files.url + "/empiar/api/entry/{entry_id}/",
            archive_https=http_files.url + "/empiar/world_availability/{entry_id}/data/",
            transport="https",
            retry_attempts=1,
        ),
    )
    version = source.check(LOG)
    assert "../../../../evil.dm3" in {f["path"] for f in version.additional_metadata["archive_files"]}
    work = tmp_path / "a" / "b" / "c" / "work"  # work/data/../../../../evil.dm3 would be tmp_path/a/evil.dm3
    manifest = DownloadManifest(work, version.fingerprint)
    with pytest.raises(ValueError, match="archive file"):  # edge.Refused
        source.fetch(work, manifest, version, LOG)
    assert not (tmp_path / "a" / "evil.dm3").exists()
    assert not [p for p in tmp_path.rglob("evil.dm3") if http_files.root not in p.parents]
