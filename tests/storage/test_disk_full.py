"""A full disk names its filesystem, the setting that put data there and what to do; the record says so
and nothing is published. The ENOSPC is the kernel's own: a write to /dev/full."""

from __future__ import annotations

import os

import dagster as dg
import numpy as np
import pytest

from em_platform.catalog.db import CatalogDB
from em_platform.resources import StorageResource
from em_platform.samples import em_texture, write_ome_tiff
from em_platform.storage.disk_full import disk_full, mount_point
from em_platform.storage.store import DataStore
from tests.support.platform import make_platform

ENTRY = "cells.ome.tif"


def kernel_enospc() -> OSError:
    if not os.path.exists("/dev/full"):
        pytest.skip("this system has no /dev/full to produce a real ENOSPC")
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        os.write(fd, b"x")
    except OSError as exc:
        return exc
    finally:
        os.close(fd)
    raise AssertionError("a write to /dev/full succeeded")


def test_the_sentence_names_mount_setting_and_usage(tmp_path):
    exc = kernel_enospc()
    assert exc.filename is None  # what makes the OS's own message useless
    where = {"EM_DOWNLOADS": "/nonexistent/elsewhere", "EM_BUFFER": str(tmp_path / "buffer")}
    assert disk_full(RuntimeError("writing the chunk failed"), where) is None  # not a full disk
    try:
        raise RuntimeError("writing the chunk failed") from exc
    except RuntimeError as wrapped:
        text = disk_full(wrapped, where)
    mount = mount_point(str(tmp_path))
    assert f"mounted at {mount}" in text and "GiB free of" in text and "nothing half-written" in text
    named = OSError(exc.errno, exc.strerror, str(tmp_path / "buffer" / "tile_0001.tif"))
    text = disk_full(named, where)
    assert (
        "point EM_BUFFER" in text
        and "at a larger volume" in text
        and str(tmp_path / "buffer" / "tile_0001.tif") in text
    )


def test_a_full_disk_fails_the_ingest_by_name_and_publishes_nothing(tmp_path, monkeypatch):
    catalog_url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    platform = make_platform(tmp_path, catalog_url=catalog_url)
    write_ome_tiff(
        platform.inbox / ENTRY,
        em_texture((2, 64, 64), seed=1, dtype=np.uint16),
        {"z": 40.0, "y": 4.0, "x": 4.0},
    )

    def publish_onto_a_full_disk(self, staging, final):
        raise kernel_enospc()

    monkeypatch.setattr(DataStore, "publish", publish_onto_a_full_disk)
    storage = StorageResource(
        root_url=platform.settings.data_root,
        buffer_root=platform.settings.buffer,
        downloads_root=platform.settings.downloads,
    )
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("inbox_entries", [ENTRY])
        result = platform.defs.resolve_job_def("ingest_local_job").execute_in_process(
            instance=instance, partition_key=ENTRY, resources={"storage": storage}, raise_on_error=False
        )
    assert not result.success
    mount = mount_point(platform.settings.data_root)
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data.description
    assert f"no space left on the filesystem mounted at {mount}" in failure and "EM_DATA_ROOT" in failure
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]  # not an outage
    db = CatalogDB(catalog_url)
    rec = db.find("local", ENTRY)
    db.dispose()
    assert rec["status"] == "failed" and f"mounted at {mount}" in rec["error"]["message"]
    published = [p for p in platform.data_root.rglob("*.ome.zarr")]
    assert published == []
