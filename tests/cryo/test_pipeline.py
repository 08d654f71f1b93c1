"""End to end through Dagster: the cryo sensor finds two tilt series in a session folder, each is a partition;
the good one is processed and scored against its truth, the bad one (gain of the wrong shape) fails alone with
the file and the fault named, and both outcomes are in the results tables."""

import os
import time

import dagster as dg
import mrcfile
import numpy as np
import pytest
import sqlalchemy as sa

from em_platform.assets.cryo import cryo_assets
from em_platform.resources import CatalogResource, CryoSessionsResource, StorageResource
from em_platform.sensors.cryo import cryo_sensor
from tests.cryo.synthetic import make_tilt_series

pytestmark = pytest.mark.slow


def _settle(root):
    old = time.time() - 60
    for dirpath, _, files in os.walk(root):
        for f in files:
            os.utime(os.path.join(dirpath, f), (old, old))


def test_session_to_tomogram_results_and_evaluation(tmp_path):
    sessions = tmp_path / "sessions"
    make_tilt_series(
        sessions / "grid1" / "good",
        "TS_01",
        size=128,
        angles=tuple(range(-45, 46, 9)),
        frames=4,
        seed=3,
        axis_deg=2.0,
        phantom_binning=2,
        thickness_px=32,
    )
    make_tilt_series(
        sessions / "grid1" / "bad", "TS_02", size=96, angles=tuple(range(-30, 31, 15)), frames=3, seed=4
    )
    with mrcfile.new(sessions / "grid1" / "bad" / "gain_ref.mrc", overwrite=True) as m:
        m.set_data(np.ones((80, 96), np.float32))
    _settle(sessions)
    resources = {
        "cryo_sessions": CryoSessionsResource(
            sessions=str(sessions), simulation=str(tmp_path / "data" / "simulation")
        ),
        "storage": StorageResource(
            root_url=str(tmp_path / "data"),
            buffer_root=str(tmp_path / "buffer"),
            downloads_root=str(tmp_path / "dl"),
        ),
        "catalog": CatalogResource(url=f"sqlite:///{tmp_path / 'catalog.sqlite'}"),
    }
    with dg.instance_for_test() as instance:
        sensor_resources = {"cryo_sessions": resources["cryo_sessions"]}
        with dg.build_sensor_context(instance=instance, resources=sensor_resources) as ctx:
            result = cryo_sensor(ctx)
        keys = sorted(r.partition_key for r in result.run_requests)
        assert keys == ["sessions/grid1/bad/TS_02", "sessions/grid1/good/TS_01"]
        assert all(
            dg.AssetKey(["simulation", "evaluation"]) in r.asset_selection for r in result.run_requests
        )
        instance.add_dynamic_partitions("cryo_tilt_series", keys)
        with dg.build_sensor_context(
            instance=instance, resources=sensor_resources, cursor=result.cursor
        ) as c2:
            again = cryo_sensor(c2)
        assert again.run_requests == [] or again.run_requests is None

        bad = dg.materialize(
            cryo_assets, instance=instance, partition_key=keys[0], resources=resources, raise_on_error=False
        )
        assert not bad.success
        failure = next(e for e in bad.all_events if e.event_type_value == "STEP_FAILURE")
        assert "gain_ref.mrc has shape (80, 96)" in str(failure.event_specific_data.error)

        good = dg.materialize(
            cryo_assets, instance=instance, partition_key=keys[1], resources=resources, raise_on_error=False
        )
        checks = {e.check_name: e for e in good.get_asset_check_evaluations()}
        assert set(checks) == {
            "defocus_error",
            "astigmatism_angle",
            "drift_error",
            "shift_error",
            "tilt_axis_error",
            "fsc_better_than_unaligned",
            "denoise_gain",
        }
        # every figure is measured and reported; on this 128² fixture only the drift is held to its limit here
        # (the CTF and alignment limits are exercised in test_algorithms and reported in bench_cryo)
        assert checks["drift_error"].passed
        assert all(c.metadata for c in checks.values())
        mats = {tuple(e.asset_key.path): e for e in good.get_asset_materialization_events()}
        assert ("cryo", "results") in mats and ("cryo", "tomogram") in mats

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'catalog.sqlite'}")
    with engine.connect() as conn:
        status = dict(conn.execute(sa.text("SELECT name, status FROM cryo_tilt_series")).all())
        n_ctf = conn.execute(sa.text("SELECT count(*) FROM cryo_ctf")).scalar()
    assert status == {"TS_01": "complete", "TS_02": "failed"} and n_ctf == 11
    zarr_root = tmp_path / "data" / "cryo" / keys[1] / "tomogram.ome.zarr"
    assert (zarr_root / "zarr.json").is_file()
