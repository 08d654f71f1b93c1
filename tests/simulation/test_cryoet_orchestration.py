"""The simulation assets and sensor through Dagster: spec folder → partitions → runs → files + catalog."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import dagster as dg
import pytest
import zarr

from em_platform.catalog.db import CatalogDB
from em_platform.catalog.schema import validation_errors
from em_platform.resources import SimulationSpecsResource
from em_platform.sensors.simulation import simulation_sensor
from em_platform.simulation.truth import read_ground_truth
from tests.support.platform import make_platform

SPEC = """\
name: tiny
num_stacks: 2
seed: 5
apix: 0.4
defocus_values: [2.0, 3.0]
particles:
  - model: apoferritin_6z6u
    count: 1
sample: {thickness: 30}
geometry: {theta_start: -20, theta_incr: 20, ntilts: 3}
detector: {det_pix_x: 64, det_pix_y: 64}
simulation: {phantom_binning: 2}
"""


def _age(path: Path, seconds: float = 60) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def _tick(instance, platform, folder: Path, cursor=None):
    # closed here: the instance the context opens from the ref, left to the garbage collector, would put a
    # closed instance's storage back into Dagster's context variable whenever it is collected (in a later
    # test: "Attempted to resolve undefined DagsterInstance weakref")
    with dg.build_sensor_context(
        instance_ref=instance.get_ref(),
        cursor=cursor,
        definitions=platform.defs,
        resources={"simulation_specs": SimulationSpecsResource(path=str(folder))},
    ) as ctx:
        return simulation_sensor.evaluate_tick(ctx)


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def test_sensor_turns_each_spec_into_its_stacks(instance, tmp_path):
    platform = make_platform(tmp_path)
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "tiny.yaml").write_text(SPEC)
    (specs / "broken.yaml").write_text("name: broken\nelectronbeam: {dose_per_tilt: -3}\n")
    (specs / "notes.txt").write_text("not a spec")
    for p in specs.iterdir():
        _age(p)
    first = _tick(instance, platform, specs)
    assert sorted(r.partition_key for r in first.run_requests) == ["tiny_000", "tiny_001"]
    assert [sorted(r.partition_keys) for r in first.dynamic_partitions_requests] == [["tiny_000", "tiny_001"]]
    assert all(r.tags["em/simulation_spec"].endswith("tiny.yaml") for r in first.run_requests)
    again = _tick(instance, platform, specs, first.cursor)
    assert not again.run_requests and "no new or changed" in again.skip_message
    (specs / "tiny.yaml").write_text(SPEC.replace("num_stacks: 2", "num_stacks: 3"))
    _age(specs / "tiny.yaml")
    instance.add_dynamic_partitions("simulations", ["tiny_000", "tiny_001"])
    edited = _tick(instance, platform, specs, again.cursor)
    assert [r.partition_key for r in edited.run_requests] == ["tiny_000", "tiny_001", "tiny_002"]
    assert {r.run_key for r in edited.run_requests}.isdisjoint({r.run_key for r in first.run_requests})
    assert [list(r.partition_keys) for r in edited.dynamic_partitions_requests] == [["tiny_002"]]
    (specs / "late.yaml").write_text(SPEC.replace("name: tiny", "name: late"))  # still being written
    assert not _tick(instance, platform, specs, edited.cursor).run_requests


def test_bad_spec_is_reported_by_name(instance, tmp_path):
    platform = make_platform(tmp_path)
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "broken.yaml").write_text("name: broken\nelectronbeam: {dose_per_tilt: -3}\n")
    _age(specs / "broken.yaml")
    result = _tick(instance, platform, specs)
    assert not result.run_requests
    assert "broken.yaml" in result.skip_message
    assert "electronbeam.dose_per_tilt" in result.skip_message


@pytest.mark.slow
def test_simulation_job_materializes_files_zarr_record_and_truth(instance, tmp_path):
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "tiny.yaml").write_text(SPEC)
    platform = make_platform(tmp_path, extra_env={"EM_SIMULATIONS": str(specs)})
    instance.add_dynamic_partitions("simulations", ["tiny_000", "tiny_001", "gone_000"])
    job = platform.defs.resolve_job_def("simulation_job")
    result = job.execute_in_process(instance=instance, partition_key="tiny_001")
    assert result.success
    folder = platform.data_root / "simulation" / "tiny" / "tiny_001"
    truth = read_ground_truth(folder / "ground_truth.json")
    assert truth.tilts[0].defocus_u_A == pytest.approx(3.0e4, abs=3000)  # round-robin: stack 1 → 3 µm
    db = CatalogDB(platform.settings.catalog_url)
    record = db.find("simulation", "tiny_001")
    assert record["status"] == "complete" and validation_errors(record) == []
    assert record["metadata"]["core"]["volume_shape"] == [3, 64, 64]
    assert {f["path"] for f in record["files"]["source"]} >= {
        "tiny_001.mrc",
        "tiny_001.mrc.mdoc",
        "ground_truth.json",
    }
    level0 = zarr.open_group(record["files"]["volume"], mode="r")["0"]
    assert level0.shape == (3, 64, 64)
    events = {
        k: instance.get_latest_materialization_event(dg.AssetKey(["simulation", k]))
        for k in ("particle_library", "sample", "tilt_series", "ground_truth")
    }
    assert all(e is not None and e.asset_materialization.partition == "tiny_001" for e in events.values())
    meta = events["tilt_series"].asset_materialization.metadata
    assert meta["thumbnail"].value.startswith("![tiny_001](data:image/png;base64,")
    assert events["sample"].asset_materialization.metadata["particles"].value == 1
    # a re-run of an unchanged spec keeps the stack; a removed spec fails naming what is missing
    rerun = job.execute_in_process(instance=instance, partition_key="tiny_001")
    meta = instance.get_latest_materialization_event(
        dg.AssetKey(["simulation", "tilt_series"])
    ).asset_materialization.metadata
    assert rerun.success and meta["simulated"].value is False
    gone = job.execute_in_process(instance=instance, partition_key="gone_000", raise_on_error=False)
    assert not gone.success
    message = json.dumps([str(e.event_specific_data) for e in gone.all_events if e.is_failure])
    assert "no spec named 'gone'" in message
