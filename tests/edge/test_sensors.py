"""The inbox and montage sensors and a run request for an inbox entry at the edge: what they refuse is
neither requested nor ingested, and is kept in the dead letters (read here as the table an operator's
``em-platform dead-letters`` lists)."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from types import SimpleNamespace

import dagster as dg
import numpy as np
import pytest
import sqlalchemy as sa
import tifffile

from em_platform.assets.ingest_local import ingest_local
from em_platform.catalog.db import CatalogDB
from em_platform.ingest.local import ingest_entry
from em_platform.resources import InboxResource
from em_platform.resources.acquisition import SimulatedScope
from em_platform.sensors.inbox import inbox_sensor
from em_platform.sensors.montage import montage_sensor
from em_platform.storage import DataStore
from em_platform.tem.journal import Journal
from tests.support.platform import make_platform


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def _tick(sensor, instance, platform, cursor=None, **resources):
    with dg.build_sensor_context(
        instance_ref=instance.get_ref(),
        cursor=cursor,
        definitions=platform.defs,
        resources={**platform.defs.resources, **resources},
    ) as ctx:
        return sensor.evaluate_tick(ctx)


def _letters(platform) -> list:
    engine = sa.create_engine(platform.settings.catalog_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM dead_letters ORDER BY id")).mappings().all()
    finally:
        engine.dispose()
    return [SimpleNamespace(**r) for r in rows]


def test_inbox_symlinks_out_of_the_inbox_are_not_followed(instance, tmp_path):
    platform = make_platform(tmp_path)
    inbox, secret = platform.inbox, tmp_path / "elsewhere"
    (secret / "stack").mkdir(parents=True)
    tifffile.imwrite(secret / "private.tif", np.full((8, 8), 7, np.uint8))
    tifffile.imwrite(secret / "stack" / "s_0.tif", np.full((8, 8), 7, np.uint8))
    tifffile.imwrite(inbox / "scan.tif", np.ones((8, 8), np.uint8))
    os.symlink(secret / "private.tif", inbox / "link_out.tif")  # a file outside, linked in
    os.symlink(secret / "stack", inbox / "dir_out")  # a folder outside, linked in
    (inbox / "mixed").mkdir()
    tifffile.imwrite(inbox / "mixed" / "s_0.tif", np.ones((8, 8), np.uint8))
    os.symlink(secret / "stack" / "s_0.tif", inbox / "mixed" / "s_1.tif")  # one slice of a folder outside
    os.symlink(inbox / "scan.tif", inbox / "alias.tif")  # stays inside: followed (decided; README)
    inbox_res = InboxResource(path=str(inbox), settle_seconds=0)

    result = _tick(inbox_sensor, instance, platform, inbox=inbox_res)
    assert sorted(r.partition_key for r in result.run_requests) == ["alias.tif", "scan.tif"]
    letters = _letters(platform)
    assert sorted(x.body.rsplit("/", 1)[-1] for x in letters) == ["dir_out", "link_out.tif", "mixed"]
    assert {(x.source, x.topic) for x in letters} == {("inbox", "ingest/local")}
    assert all("outside" in x.reason and str(inbox.resolve()) in x.reason for x in letters)
    again = _tick(inbox_sensor, instance, platform, cursor=result.cursor, inbox=inbox_res)
    assert not again.run_requests and [x.times for x in _letters(platform)] == [1, 1, 1]  # reported once

    # a run requested by hand for such an entry (or after a swap since the tick) ingests nothing either
    catalog = CatalogDB(platform.settings.catalog_url)
    try:
        for entry in [inbox / "link_out.tif", inbox / "mixed", inbox / ".." / "elsewhere" / "private.tif"]:
            with pytest.raises(ValueError, match="outside|entry"):  # edge.Refused
                ingest_entry(
                    entry, inbox, store=DataStore(platform.settings.data_root), catalog=catalog, lineage={}
                )
        assert catalog.records() == []
    finally:
        catalog.dispose()
    assert not (platform.data_root / "ingest").exists()


def test_a_run_request_for_a_traversal_partition_key_is_dead_lettered(instance, tmp_path):
    platform = make_platform(tmp_path)
    tifffile.imwrite(tmp_path / "outside.tif", np.ones((8, 8), np.uint8))
    key = "../outside.tif"  # a partition key added through the UI or the API, not by the sensor
    instance.add_dynamic_partitions("inbox_entries", [key])
    result = dg.materialize(
        [ingest_local], partition_key=key, instance=instance, resources=platform.defs.resources,
        raise_on_error=False,
    )  # fmt: skip
    assert not result.success
    [letter] = _letters(platform)
    assert (letter.source, letter.field, letter.body) == ("request", "partition_key", key)
    assert not (platform.data_root / "ingest").exists()


def test_montage_sensor_makes_no_partition_of_an_unsafe_journal_row(instance, tmp_path):
    platform = make_platform(tmp_path)
    url = platform.settings.catalog_url
    journal = Journal(url)  # creates the tables; the row below is one written before the edge checks
    now = datetime.now(UTC)
    with journal.engine.begin() as conn:
        for seq, mid in [(1, "../../../../elsewhere"), (2, "m-ok")]:
            conn.execute(
                sa.text(
                    "INSERT INTO acq_montages (montage_id, seq, state, updated_at) VALUES (:m, :s, 'started', :t)"
                ),
                {"m": mid, "s": seq, "t": now},
            )
    journal.dispose()
    tick = _tick(montage_sensor, instance, platform, hardware=SimulatedScope(journal_url=url))
    assert [r.partition_key for r in tick.run_requests] == ["m-ok"]
    assert [list(r.partition_keys) for r in tick.dynamic_partitions_requests] == [["m-ok"]]
    [letter] = _letters(platform)
    assert (letter.source, letter.topic, letter.field) == ("journal", "montage", "montage_id")
