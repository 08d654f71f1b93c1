"""The acquisition edges without a broker: the journal the embedded simulator writes, the ``scope-sim`` CLI,
and a montage run that meets tiles off the scope share in the journal (written before the checks existed,
or by a writer that trusted its scope): refused before anything opens them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from distributed import Client, LocalCluster

from em_platform.cli import main
from em_platform.resources.acquisition import SimulatedScope
from em_platform.simulation.scope import simulate_montage
from em_platform.simulation.scope_config import ScopeConfig
from em_platform.tem.journal import Journal
from em_platform.tem.montage_run import MontageRunConfig, run_montage

HOSTILE = "../../../../elsewhere"


def _rows(journal: Journal, table: str) -> int:
    with journal.engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()


def test_journal_refuses_hostile_ids_and_tiles_off_the_share_before_writing(tmp_path):
    share = tmp_path / "share"
    tile = {
        "tile_id": "t-1",
        "montage_id": "m-1",
        "row": 0,
        "column": 0,
        "overlap": 0,
        "path": str(share / "t.tiff"),
    }
    journal = Journal(f"sqlite:///{tmp_path / 'j.sqlite'}")  # ids are checked whoever writes
    try:
        for topic, payload, field in [
            ("montage.status", {"montage_id": HOSTILE, "state": "started", "current_tile": 0, "total_tiles": 1}, "montage_id"),
            ("tile.raw", {**tile, "montage_id": HOSTILE}, "montage_id"),
            ("tile.raw", {**tile, "tile_id": "../t"}, "tile_id"),
        ]:  # fmt: skip
            with pytest.raises(ValueError) as exc:  # edge.Refused
                journal.record(topic, payload)
            assert exc.value.field == field
        assert _rows(journal, "acq_messages") == 0 and journal.montage(HOSTILE) is None
    finally:
        journal.dispose()
    journal = Journal(
        f"sqlite:///{tmp_path / 'j.sqlite'}", tile_shares=[share]
    )  # as every entry point opens it
    try:
        for path in ["/etc/passwd", str(share / ".." / "t.tiff")]:
            with pytest.raises(ValueError) as exc:
                journal.record("tile.raw", {**tile, "path": path})
            assert exc.value.field == "path"
        assert _rows(journal, "acq_messages") == 0
        assert journal.record("tile.raw", tile) is True  # on the share: journaled
    finally:
        journal.dispose()


def test_scope_sim_refuses_a_traversal_montage_id_and_an_out_folder_off_the_share(
    tmp_path, monkeypatch, capsys
):
    data = tmp_path / "data"
    monkeypatch.setenv("EM_DATA_ROOT", str(data))
    monkeypatch.delenv("EM_BROKER", raising=False)
    monkeypatch.delenv("EM_SCOPE_SHARES", raising=False)
    deep = tmp_path / "a" / "b" / "c" / "d"  # "../../../../elsewhere" under it would be tmp_path/a/elsewhere
    tiny = [
        "--rows",
        "1",
        "--columns",
        "2",
        "--tile-size",
        "64",
        "--jitter",
        "1",
        "--brightfield-frames",
        "0",
        "--darkfield-frames",
        "0",
    ]
    assert main(["scope-sim", *tiny, "--out", str(deep), "--montage-id", HOSTILE]) == 2
    assert "--montage-id" in capsys.readouterr().err
    assert not (tmp_path / "a" / "elsewhere").exists() and not (data / "elsewhere").exists()
    assert main(["scope-sim", *tiny, "--out", str(tmp_path / "off-share"), "--montage-id", "m-1"]) == 2
    assert "not under a scope share" in capsys.readouterr().err and not (tmp_path / "off-share").exists()
    journal = Journal(f"sqlite:///{data / 'catalog.sqlite'}")
    try:
        assert _rows(journal, "acq_messages") == 0
        # the embedded default: tiles under <data root>/scope, the default share, are journaled as before
        assert main(["scope-sim", *tiny, "--montage-id", "m-ok"]) == 0
        assert [Path(t.path).parent for t in journal.tiles("m-ok")] == [data / "scope" / "m-ok"] * 2
    finally:
        journal.dispose()


@pytest.fixture(scope="module")
def client():
    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0"
    ) as cluster:
        with Client(cluster) as c:
            yield c


def test_run_never_opens_a_tile_off_the_share(tmp_path, client, monkeypatch):
    share, outside = tmp_path / "share", tmp_path / "outside"
    outside.mkdir()
    url = f"sqlite:///{tmp_path / 'j.sqlite'}"
    trusting = Journal(url)  # a writer without the share check (an older listener, a library caller)

    def record(topic, payload):
        if topic == "tile.raw" and (payload["row"], payload["column"]) == (0, 1):
            moved = outside / Path(payload["path"]).name  # a real tile, but off the share
            shutil.move(payload["path"], moved)
            payload = {**payload, "path": str(moved)}
        elif topic == "tile.raw" and (payload["row"], payload["column"]) == (0, 2):
            payload = {**payload, "path": "/etc/passwd"}
        trusting.record(topic, payload)

    cfg = ScopeConfig(rows=1, columns=3, tile_size=128, overlap=0.15, jitter_px=4.0)
    truth = simulate_montage(cfg, share / "m", record, sleep=lambda s: None)
    monkeypatch.setenv("EM_SCOPE_SHARES", str(share))
    hardware = SimulatedScope(journal_url=url)  # the shares come from the settings, as in a deployment
    source = hardware.tile_source()
    try:
        run_montage(
            truth.montage_id,
            source,
            client,
            processed_url=str(tmp_path / "processed.zarr"),
            config=MontageRunConfig(poll_seconds=0.05, late_tile_seconds=0.5),
        )
    finally:
        source.close()
    tiles = {(t.row, t.column): t for t in trusting.tiles(truth.montage_id) if not t.is_reference}
    assert tiles[(0, 0)].status == "processed"
    for cell in [(0, 1), (0, 2)]:  # refused by the run's tile source, before any worker read them
        assert tiles[cell].status == "failed" and "not under a scope share" in tiles[cell].error
        assert tiles[cell].results is None
    with trusting.engine.connect() as conn:
        letters = conn.execute(sa.text("SELECT source, field, body FROM dead_letters")).all()
    assert sorted((s, f) for s, f, _ in letters) == [("journal", "path"), ("journal", "path")]
    assert any("/etc/passwd" in b for _, _, b in letters) and any(str(outside) in b for _, _, b in letters)
    trusting.dispose()
    hardware.journal().dispose()


def test_scope_sim_names_its_tiles_where_the_platform_mounts_the_share(tmp_path, monkeypatch, capsys):
    """The scope writes a share the platform mounts elsewhere (compose: the data volume's scope folder on the
    host, /data/scope in the containers): --share-as names the tiles under the platform's path, and that
    path, not --out, must be on a scope share."""
    data, written, mounted = tmp_path / "data", tmp_path / "volume" / "scope", tmp_path / "mnt" / "scope"
    monkeypatch.setenv("EM_DATA_ROOT", str(data))
    monkeypatch.delenv("EM_BROKER", raising=False)
    monkeypatch.setenv("EM_SCOPE_SHARES", str(mounted))
    tiny = ["--rows", "1", "--columns", "2", "--tile-size", "64", "--jitter", "1"]
    tiny += ["--brightfield-frames", "0", "--darkfield-frames", "0"]
    assert main(["scope-sim", *tiny, "--out", str(written), "--montage-id", "m-off"]) == 2
    assert "not under a scope share" in capsys.readouterr().err
    assert (
        main(["scope-sim", *tiny, "--out", str(written), "--share-as", str(tmp_path), "--montage-id", "m-x"])
        == 2
    )
    assert "--share-as" in capsys.readouterr().err
    args = ["scope-sim", *tiny, "--out", str(written), "--share-as", str(mounted), "--montage-id", "m-1"]
    assert main(args) == 0
    journal = Journal(f"sqlite:///{data / 'catalog.sqlite'}")
    try:
        paths = [Path(t.path) for t in journal.tiles("m-1")]
    finally:
        journal.dispose()
    assert len(paths) == 2 and all(p.parent == mounted / "m-1" for p in paths)
    assert all(
        (written / "m-1" / p.name).is_file() for p in paths
    )  # the files are where the scope wrote them
