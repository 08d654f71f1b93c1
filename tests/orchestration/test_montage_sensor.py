"""The montage sensor through build_sensor_context: new montage, nothing new, restart with an old cursor."""

from __future__ import annotations

import time

import dagster as dg
import pytest

from em_platform.resources import SimulatedScope
from em_platform.sensors.montage import montage_sensor
from em_platform.tem.journal import Journal
from tests.support.platform import make_platform


def _tile(montage: str, i: int) -> dict:
    return {
        "tile_id": f"{montage}-t{i}",
        "montage_id": montage,
        "row": i // 100,
        "column": i % 100,
        "overlap": 51,
        "stage_position": [i * 1000, 0],
        "path": f"/tiles/{montage}/{i}.tiff",
    }


@pytest.fixture
def setup(tmp_path):
    platform = make_platform(tmp_path)
    journal = Journal(platform.settings.catalog_url)
    with dg.instance_for_test() as instance:
        yield platform, journal, instance
    journal.dispose()


def _tick(setup, cursor=None):
    platform, _, instance = setup
    with dg.build_sensor_context(
        instance_ref=instance.get_ref(),
        cursor=cursor,
        definitions=platform.defs,
        resources={"hardware": SimulatedScope(journal_url=platform.settings.catalog_url)},
    ) as ctx:
        return montage_sensor.evaluate_tick(ctx)


def test_new_montage_gets_a_partition_and_one_run_keyed_by_its_id(setup):
    _, journal, _ = setup
    for i in range(3):
        journal.record("tile.raw", _tile("m-1", i))
    result = _tick(setup)
    assert [(r.partition_key, r.run_key) for r in result.run_requests] == [("m-1", "m-1")]
    assert [list(r.partition_keys) for r in result.dynamic_partitions_requests] == [["m-1"]]
    assert int(result.cursor) > 0


def test_nothing_new_after_more_tiles_of_a_known_montage(setup):
    _, journal, _ = setup
    journal.record("tile.raw", _tile("m-1", 0))
    first = _tick(setup)
    for i in range(1, 20):
        journal.record("tile.raw", _tile("m-1", i))
    second = _tick(setup, first.cursor)
    assert not second.run_requests and "no new montage" in second.skip_message
    assert second.cursor == first.cursor


def test_restart_with_an_old_cursor_neither_loses_nor_duplicates(setup):
    _, journal, instance = setup
    journal.record("tile.raw", _tile("m-1", 0))
    first = _tick(setup)
    instance.add_dynamic_partitions("montages", ["m-1"])
    journal.record("tile.raw", _tile("m-2", 0))
    journal.record("tile.raw", _tile("m-3", 0))
    # The daemon died before storing the cursor of the tick that saw m-2/m-3: it restarts from `first`.
    again = _tick(setup, first.cursor)
    assert [r.run_key for r in again.run_requests] == ["m-2", "m-3"]
    # …and from an even older cursor, m-1 comes back with the same run key (which Dagster never launches
    # twice) while no partition is added twice.
    oldest = _tick(setup, None)
    assert [r.run_key for r in oldest.run_requests] == ["m-1", "m-2", "m-3"]
    assert [sorted(r.partition_keys) for r in oldest.dynamic_partitions_requests] == [["m-2", "m-3"]]


def test_tick_stays_fast_with_ten_thousand_new_tiles(setup):
    _, journal, _ = setup
    with (
        journal.engine.begin() as conn
    ):  # bulk-load 10,000 tiles of 4 montages through the journal's own rules
        from em_platform.tem import journal as j

        for k in range(4):
            j._apply_tile_raw(conn, _tile(f"big-{k}", 0), k + 1, j._now())
        conn.execute(
            j.tiles.insert(),
            [
                {
                    "tile_id": f"x{i}",
                    "montage_id": f"big-{i % 4}",
                    "seq": 10 + i,
                    "row": i // 100,
                    "column": i % 100,
                    "path": "/t",
                    "brightfield": False,
                    "darkfield": False,
                    "acquired_at": j._now(),
                    "status": "acquired",
                }
                for i in range(10_000)
            ],
        )
    t0 = time.perf_counter()
    result = _tick(setup)
    elapsed = time.perf_counter() - t0
    assert sorted(r.run_key for r in result.run_requests) == [f"big-{k}" for k in range(4)]
    print(f"tick with 10,000 new tiles: {elapsed:.3f} s")  # recorded, not asserted (timing belongs in bench/)
