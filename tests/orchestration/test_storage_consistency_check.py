"""storage_consistency through Dagster: a real ingest's record and objects, the check's own job, the daily
schedule (on by default), and a lost object named in the check's result."""

from __future__ import annotations

import os

import dagster as dg
import numpy as np

from em_platform.catalog.db import CatalogDB
from em_platform.samples import em_texture, write_ome_tiff
from tests.support.platform import make_platform

ENTRY = "cells.ome.tif"


def _check(platform, instance):
    result = platform.defs.resolve_job_def("storage_consistency_job").execute_in_process(instance=instance)
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == "storage_consistency"
    return evaluation


def test_the_daily_check_passes_on_a_consistent_root_and_names_a_lost_object(tmp_path):
    platform = make_platform(tmp_path)
    schedule = platform.defs.resolve_schedule_def("storage_consistency_daily")
    assert (
        schedule.default_status == dg.DefaultScheduleStatus.RUNNING and schedule.cron_schedule == "0 4 * * *"
    )
    write_ome_tiff(
        platform.inbox / ENTRY,
        em_texture((3, 64, 64), seed=1, dtype=np.uint16),
        {"z": 40.0, "y": 4.0, "x": 4.0},
    )
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("inbox_entries", [ENTRY])
        assert (
            platform.defs.resolve_job_def("ingest_local_job")
            .execute_in_process(instance=instance, partition_key=ENTRY)
            .success
        )
        assert _check(platform, instance).passed
        db = CatalogDB(platform.settings.catalog_url)
        record = db.find("local", ENTRY)
        db.dispose()
        os.remove(record["files"]["thumbnail"])
        evaluation = _check(platform, instance)
    assert not evaluation.passed
    lost = evaluation.metadata["lost"].value
    assert lost == {
        f"local/{ENTRY}": {
            "missing": [record["files"]["thumbnail"]],
            "corrupted": [],
            "record_id": record["id"],
        }
    }
    assert f"local/{ENTRY}: missing" in evaluation.description
