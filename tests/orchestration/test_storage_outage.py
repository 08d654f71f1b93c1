"""The object store goes down while an ingest publishes: the record says 'failed' with the outage (not
'processing' forever), the step is retried once the store is back, and the ingest completes."""

from __future__ import annotations

import threading
import time
import uuid

import dagster as dg
import numpy as np
import pytest
import s3fs
import zarr

from em_platform.catalog.db import CatalogDB
from em_platform.resources import StorageResource
from em_platform.samples import em_texture, write_ome_tiff
from em_platform.storage.store import DataStore
from tests.support.platform import make_platform
from tests.support.ports import free_port

ENTRY = "cells.ome.tif"


@pytest.fixture
def own_s3(monkeypatch):
    """A moto S3 server of this test only (stopping it disturbs no other test); restartable on its port,
    keeping its buckets (moto's state lives in this process). No client-side retries: a refused
    connection fails at once instead of after botocore's ~10 s of backoff."""
    server_mod = pytest.importorskip("moto.server")
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    port = free_port()
    servers = [server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)]
    servers[0].start()

    def restart():
        servers.append(server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
        servers[-1].start()

    try:
        yield f"http://127.0.0.1:{port}", servers, restart
    finally:
        try:
            servers[-1].stop()
        except Exception:
            pass


def test_an_ingest_that_meets_a_storage_outage_is_failed_then_retried_to_complete(
    tmp_path, own_s3, monkeypatch
):
    endpoint, servers, restart = own_s3
    opts = {"client_kwargs": {"endpoint_url": endpoint}}
    bucket = f"em-outage-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(**opts).mkdir(bucket)
    catalog_url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    platform = make_platform(
        tmp_path,
        data_root=f"s3://{bucket}/em",
        catalog_url=catalog_url,
        extra_env={"EM_S3_ENDPOINT_URL": endpoint},
    )
    vol = em_texture((4, 128, 96), seed=5, dtype=np.uint16)
    write_ome_tiff(platform.inbox / ENTRY, vol, {"z": 40.0, "y": 4.0, "x": 4.0})

    # The fault: the store stops answering as the finished image is about to be published.
    publish = DataStore.publish
    outage: dict = {}

    def publish_into_an_outage(self, staging, final):
        if not outage and final.endswith(".ome.zarr"):
            servers[0].stop()
            outage["at"] = time.monotonic()
        return publish(self, staging, final)

    monkeypatch.setattr(DataStore, "publish", publish_into_an_outage)
    db = CatalogDB(catalog_url)

    def store_comes_back():  # once the record says failed, as an operator restarting S3 would
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rec = db.find("local", ENTRY)
            if rec and rec["status"] == "failed":
                outage["failed"] = rec
                restart()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=store_comes_back, daemon=True)
    watcher.start()
    storage = StorageResource(
        root_url=platform.settings.data_root,
        s3_endpoint_url=endpoint,
        buffer_root=platform.settings.buffer,
        downloads_root=platform.settings.downloads,
        outage_retry_seconds=0.5,  # the first retry after 0.5 s (15 s by default)
    )
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("inbox_entries", [ENTRY])
        result = platform.defs.resolve_job_def("ingest_local_job").execute_in_process(
            instance=instance, partition_key=ENTRY, resources={"storage": storage}, raise_on_error=False
        )
    watcher.join(10)
    assert result.success, result.get_run_failure_event()
    failed = outage["failed"]
    assert failed["error"]["retry_count"] == 1
    assert (
        "storage outage" in failed["error"]["message"]
        and f"s3://{bucket}/em does not answer" in failed["error"]["message"]
    )
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retries) >= 1
    rec = db.find("local", ENTRY)
    statuses = [h.to_status for h in db.history(rec["id"])]
    db.dispose()
    assert rec["status"] == "complete"
    assert statuses[:4] == ["pending", "processing", "saving-data", "failed"]
    assert statuses[-4:] == ["pending", "processing", "saving-data", "complete"]
    group = zarr.open_group(rec["files"]["volume"], mode="r", storage_options=opts)
    np.testing.assert_array_equal(group["0"][...], vol)
