"""Hostile microscope messages through the real broker and ``em-platform listen``: refused, dead-lettered
with the field and the reason, acknowledged (not requeued), never journaled; the good ones still are."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import sqlalchemy as sa

from em_platform.cli import main
from em_platform.tem.journal import Journal
from tests.support.polling import wait_until

ROOT = Path(__file__).resolve().parents[2]


def _tile(montage_id: str, tile_id: str, path: str, column: int = 0) -> dict:
    return {
        "tile_id": tile_id,
        "montage_id": montage_id,
        "row": 0,
        "column": column,
        "overlap": 51,
        "stage_position": (column * 1843, 0),
        "path": path,
    }


def _listen(stomp_broker, env: dict) -> tuple[subprocess.Popen, list[str]]:
    """``em-platform listen`` in its own process, as an operator runs it; returns once it subscribed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "em_platform.cli", "listen", "--broker", f"{stomp_broker.host}:{stomp_broker.port}",
         "--subscription", stomp_broker.subscription, "--topic-prefix", stomp_broker.topic_prefix],
        cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    subscribed = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "subscribed to" in line:
                subscribed.set()

    threading.Thread(target=read, daemon=True).start()
    if not subscribed.wait(30):
        proc.kill()
        raise AssertionError("em-platform listen did not subscribe:\n" + "".join(lines))
    return proc, lines


def test_listener_dead_letters_traversal_ids_and_tiles_off_the_share(
    stomp_broker, start_listener, tmp_path, monkeypatch, capsys
):
    share = tmp_path / "share"
    (share / "m-good").mkdir(parents=True)
    (tmp_path / "outside.tiff").write_bytes(b"II*\x00")
    os.symlink(tmp_path / "outside.tiff", share / "m-good" / "link.tiff")
    db = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    env = {"EM_DATA_ROOT": str(tmp_path / "data"), "EM_CATALOG_URL": db, "EM_SCOPE_SHARES": str(share)}
    proc, lines = _listen(stomp_broker, env)
    hostile_id = "../../../../elsewhere"
    scope = stomp_broker.pigeon("pytem")
    try:
        scope.send("montage.status", montage_id=hostile_id, state="started", total_tiles=1)
        scope.send("tile.raw", **_tile(hostile_id, "t-1", str(share / "m" / "t-1.tiff")))
        scope.send("tile.raw", **_tile("m-good", "t-passwd", "/etc/passwd"))
        scope.send("tile.raw", **_tile("m-good", "t-link", str(share / "m-good" / "link.tiff")))
        scope.send("tile.raw", **_tile("m-good", "t-ok", str(share / "m-good" / "t-ok.tiff"), column=1))
        journal = Journal(db)
        try:
            wait_until(
                lambda: journal.tiles("m-good"), timeout=20, what="the good tile after the hostile ones"
            )
            # what the operator found on a fresh clone, now refused: nothing of it reached the journal
            assert journal.montage(hostile_id) is None
            assert [t.tile_id for t in journal.tiles("m-good")] == ["t-ok"]
            with journal.engine.connect() as conn:
                paths = {r.path for r in conn.execute(sa.text("SELECT path FROM acq_tiles"))}
                ids = {r.montage_id for r in conn.execute(sa.text("SELECT montage_id FROM acq_messages"))}
            assert paths == {str(share / "m-good" / "t-ok.tiff")} and ids == {"m-good"}
        finally:
            journal.dispose()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "1 new message(s) journaled, 0 redelivered, 4 rejected" in proc.stdout.read()
    log = "".join(lines)
    assert "field montage_id" in log and "field path" in log and "dead-lettered as #" in log

    # kept, with the field, the reason and the raw message: what `em-platform dead-letters` shows
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["dead-letters", "--json"]) == 0
    letters = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(x["source"], x["topic"], x["field"]) for x in letters] == [
        ("broker", "montage.status", "montage_id"),
        ("broker", "tile.raw", "montage_id"),
        ("broker", "tile.raw", "path"),
        ("broker", "tile.raw", "path"),
    ]
    assert "not under a scope share" in letters[2]["reason"] and "/etc/passwd" in letters[2]["body"]
    assert "resolves to" in letters[3]["reason"]  # the symlink on the share points elsewhere
    assert all(x["headers"]["destination"].startswith(stomp_broker.topic_prefix) for x in letters)

    # acknowledged once kept: a fresh listener on the same durable queue receives only what comes next
    journal = Journal(db)
    try:
        lt = start_listener(journal)
        stomp_broker.pigeon().send("tile.raw", **_tile("m-good", "t-next", str(share / "m-good" / "n.tiff")))
        wait_until(lambda: len(journal.tiles("m-good")) == 2, 10, "the next tile")
        assert lt.finish().received == 1
    finally:
        journal.dispose()
