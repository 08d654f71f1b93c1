"""The inbox sensor through build_sensor_context: new, unchanged, changed and partially written entries."""

from __future__ import annotations

import json
import os
import time

import dagster as dg
import numpy as np
import pytest
import tifffile

from em_platform.resources import InboxResource
from em_platform.sensors.inbox import inbox_sensor
from tests.support.platform import make_platform


def _age(path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def _tick(instance, inbox, cursor=None, settle=5.0):
    platform = make_platform(inbox.parent / "platform", settle=settle)
    with dg.build_sensor_context(
        instance_ref=instance.get_ref(),
        cursor=cursor,
        definitions=platform.defs,
        resources={**platform.defs.resources, "inbox": InboxResource(path=str(inbox), settle_seconds=settle)},
    ) as ctx:
        return inbox_sensor.evaluate_tick(ctx)


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def _write_tif(path, value=1):
    tifffile.imwrite(path, np.full((8, 8), value, np.uint8))


def test_new_settled_files_become_partitions_and_runs(instance, tmp_path):
    _write_tif(tmp_path / "a.tif")
    _write_tif(tmp_path / "b.tif")
    (tmp_path / "notes.txt").write_text("ignored: not an image")
    for p in tmp_path.iterdir():
        _age(p, 60)
    result = _tick(instance, tmp_path)
    assert sorted(r.partition_key for r in result.run_requests) == ["a.tif", "b.tif"]
    assert [sorted(r.partition_keys) for r in result.dynamic_partitions_requests] == [["a.tif", "b.tif"]]
    assert all(r.run_key.startswith(r.partition_key + "@") for r in result.run_requests)
    assert set(json.loads(result.cursor)) == {"a.tif", "b.tif"}


def test_unchanged_files_are_not_requested_again(instance, tmp_path):
    _write_tif(tmp_path / "a.tif")
    _age(tmp_path / "a.tif", 60)
    first = _tick(instance, tmp_path)
    instance.add_dynamic_partitions("inbox_entries", ["a.tif"])
    second = _tick(instance, tmp_path, cursor=first.cursor)
    assert not second.run_requests
    assert second.skip_message == "nothing new in the inbox"
    assert second.cursor == first.cursor


def test_changed_file_is_requested_again_with_a_new_run_key(instance, tmp_path):
    p = tmp_path / "a.tif"
    _write_tif(p, 1)
    _age(p, 60)
    first = _tick(instance, tmp_path)
    instance.add_dynamic_partitions("inbox_entries", ["a.tif"])
    _write_tif(p, 2)
    _age(p, 30)
    second = _tick(instance, tmp_path, cursor=first.cursor)
    assert [r.partition_key for r in second.run_requests] == ["a.tif"]
    assert second.run_requests[0].run_key != first.run_requests[0].run_key
    assert not second.dynamic_partitions_requests  # the partition already exists


def test_file_still_being_written_waits_until_it_settles(instance, tmp_path):
    p = tmp_path / "growing.tif"
    _write_tif(p)  # mtime = now: the copy may still be going on
    first = _tick(instance, tmp_path)
    assert not first.run_requests and "still arriving" in first.skip_message
    assert json.loads(first.cursor) == {}
    _age(p, 60)
    second = _tick(instance, tmp_path, cursor=first.cursor)
    assert [r.partition_key for r in second.run_requests] == ["growing.tif"]


def test_partial_download_names_and_hidden_files_are_never_entries(instance, tmp_path):
    for name in ("big.mrc.part", ".hidden.tif", "x.tif.tmp", "y.dm4.crdownload"):
        (tmp_path / name).write_bytes(b"\0" * 100)
        _age(tmp_path / name, 60)
    assert not _tick(instance, tmp_path).run_requests


def test_folder_stack_is_one_entry_and_a_new_slice_changes_it(instance, tmp_path):
    stack = tmp_path / "sections"
    stack.mkdir()
    for i in range(3):
        _write_tif(stack / f"s{i}.tif", i)
    for p in [*stack.iterdir(), stack]:
        _age(p, 60)
    first = _tick(instance, tmp_path)
    assert [r.partition_key for r in first.run_requests] == ["sections"]
    instance.add_dynamic_partitions("inbox_entries", ["sections"])
    _write_tif(stack / "s3.tif", 3)
    for p in [*stack.iterdir(), stack]:
        _age(p, 60)
    second = _tick(instance, tmp_path, cursor=first.cursor)
    assert [r.partition_key for r in second.run_requests] == ["sections"]


def test_missing_inbox_is_quietly_empty(instance, tmp_path):
    result = _tick(instance, tmp_path / "not-there")
    assert not result.run_requests and result.skip_message == "nothing new in the inbox"
