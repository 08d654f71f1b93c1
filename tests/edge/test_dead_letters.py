"""What the operator sees and does with the dead letters: ``dead_letter_sensor`` fails its ticks while any
wait, ``em-platform dead-letters`` lists them, replays a broker letter once its cause is fixed (through the
same checks) and records a decision with ``--clear``."""

from __future__ import annotations

import json
import os

import dagster as dg
import pytest

from em_platform.cli import main
from em_platform.sensors.dead_letters import dead_letter_sensor
from em_platform.tem.journal import Journal
from tests.support.platform import make_platform


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def _tick(instance, platform):
    with dg.build_sensor_context(
        instance_ref=instance.get_ref(), definitions=platform.defs, resources=platform.defs.resources
    ) as ctx:
        return dead_letter_sensor.evaluate_tick(ctx)


def test_operator_sees_replays_and_clears_dead_letters(instance, tmp_path, monkeypatch, capsys):
    platform = make_platform(tmp_path)
    for name, value in {
        "EM_DATA_ROOT": platform.settings.data_root,
        "EM_CATALOG_URL": platform.settings.catalog_url,
        "EM_SCOPE_SHARES": str(tmp_path / "scope1"),
    }.items():
        monkeypatch.setenv(name, value)
    assert _tick(instance, platform).skip_message == "no dead letters waiting"

    # a second scope's tiles arrived before its share was configured: refused and kept by the listener
    journal = Journal(platform.settings.catalog_url)
    tile = {"tile_id": "t-1", "montage_id": "m-2", "row": 0, "column": 0, "overlap": 0}
    tile["path"] = str(tmp_path / "scope2" / "m-2" / "t-1.tiff")
    journal.dead_letter("broker", "tile.raw", "path", "not under a scope share", json.dumps(tile), {"x": "1"})
    journal.dead_letter("inbox", "ingest/local", "entry", "resolves outside the inbox", "/inbox/link.tif")
    with pytest.raises(Exception, match=r"(?s)2 refused message.*em-platform dead-letters"):
        _tick(instance, platform)  # a red tick in the UI until someone decides

    assert main(["dead-letters"]) == 0
    out = capsys.readouterr().out
    assert "#1 " in out and "broker tile.raw field path" in out and "2 waiting" in out
    assert main(["dead-letters", "--replay", "all"]) == 1  # still off the configured shares
    out = capsys.readouterr().out
    assert "#1 tile.raw: still refused" in out and "#2 (inbox ingest/local): nothing to replay" in out
    monkeypatch.setenv("EM_SCOPE_SHARES", f"{tmp_path / 'scope1'}{os.pathsep}{tmp_path / 'scope2'}")
    assert main(["dead-letters", "--replay", "1"]) == 0
    assert "#1 tile.raw: journaled" in capsys.readouterr().out
    assert [t.tile_id for t in journal.tiles("m-2")] == ["t-1"]
    journal.dispose()
    assert main(["dead-letters", "--clear", "2"]) == 0
    assert _tick(instance, platform).skip_message == "no dead letters waiting"
    assert main(["dead-letters", "--all"]) == 0
    out = capsys.readouterr().out
    assert "[replayed]" in out and "[cleared]" in out and "0 waiting, 2 cleared" in out
    assert main(["dead-letters", "--clear", "x"]) == 2
