"""ingest/local against production-like back ends: an S3 storage root (moto server) and a PostgreSQL catalog."""

from __future__ import annotations

import dagster as dg
import numpy as np
import s3fs
import zarr

from em_platform.catalog.db import CatalogDB
from em_platform.samples import em_texture, write_ome_tiff
from tests.support.platform import make_platform


def test_ingest_to_s3_with_postgres_catalog(tmp_path, s3_bucket, s3_endpoint, pg_url):
    bucket_url, opts = s3_bucket
    platform = make_platform(
        tmp_path,
        data_root=f"{bucket_url}/em",
        catalog_url=pg_url,
        extra_env={"EM_S3_ENDPOINT_URL": s3_endpoint},
    )
    vol = em_texture((6, 300, 280), seed=21, dtype=np.uint16)
    write_ome_tiff(platform.inbox / "cells.ome.tif", vol, {"z": 40.0, "y": 4.0, "x": 4.0})
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("inbox_entries", ["cells.ome.tif"])
        result = platform.defs.resolve_job_def("ingest_local_job").execute_in_process(
            instance=instance, partition_key="cells.ome.tif"
        )
        assert result.success
        catalog = platform.defs.resolve_job_def("catalog_job").execute_in_process(instance=instance)
        assert catalog.get_asset_check_evaluations()[0].passed
    db = CatalogDB(pg_url)
    rec = db.find("local", "cells.ome.tif")
    db.dispose()
    assert rec["status"] == "complete"
    assert rec["files"]["volume"] == f"{bucket_url}/em/ingest/local/cells.ome.zarr"
    group = zarr.open_group(rec["files"]["volume"], mode="r", storage_options=opts)
    np.testing.assert_array_equal(group["0"][...], vol)
    fs = s3fs.S3FileSystem(**opts)
    assert not fs.exists(f"{bucket_url[5:]}/em/.staging") or not fs.find(f"{bucket_url[5:]}/em/.staging")
    assert fs.glob(f"{bucket_url[5:]}/em/catalog/metadata_catalog_*.json")
