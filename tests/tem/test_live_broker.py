"""Live QC against a real scope's message order: pigeon scopes publish to the real broker (RabbitMQ STOMP),
the listener journals, the montage run judges, and the verdicts come back on the broker."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from em_platform.resources import build_resources
from em_platform.simulation.scope import simulate_montage
from em_platform.simulation.scope_config import ScopeConfig
from em_platform.tem.broker import BrokerSettings, BrokerUnavailable
from em_platform.tem.journal import Journal
from em_platform.tem.montage_run import MontageRunConfig, run_montage
from em_platform.tem.tile_source import JournalTileSource, Outbox
from tests.support.polling import wait_until

from .conftest import ListenerThread

ROOT = Path(__file__).resolve().parents[2]

# A listener process that dies (SIGKILL) right after the journal commit of one message, before its ACK.
KILLED_AFTER_COMMIT = """
import os, signal, sys, threading
from em_platform.tem.journal import Journal
from em_platform.tem.listener import run_listener

url, host, port, subscription, prefix, target = sys.argv[1:]

class DiesAfterCommit(Journal):
    def record(self, topic, payload, **kw):
        new = super().record(topic, payload, **kw)
        if payload.get("tile_id") == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return new

ready = threading.Event()
threading.Thread(target=lambda: (ready.wait(), print("ready", flush=True)), daemon=True).start()
run_listener(host, int(port), DiesAfterCommit(url), stop=threading.Event(), ready=ready,
             subscription_name=subscription, topic_prefix=prefix, backoff=(0.05, 0.5))
"""


@pytest.fixture(scope="module")
def client():
    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0"
    ) as cluster:
        with Client(cluster) as c:
            yield c


def _heard(stomp_broker, *topics: str) -> queue.Queue:
    """What a downstream service subscribed to ``topics`` receives: (topic, message) pairs."""
    heard: queue.Queue = queue.Queue()
    service = stomp_broker.pigeon("downstream")
    for topic in topics:
        service.subscribe(topic, lambda msg, topic, headers: heard.put((topic, msg)))
    stomp_broker.sync(service)
    return heard


def _drain(q: queue.Queue, until, timeout: float = 30.0) -> list:
    got: list = []
    wait_until(lambda: (got.extend(iter_nowait(q)), until(got))[1], timeout, "messages on the broker")
    return got


def iter_nowait(q: queue.Queue):
    while True:
        try:
            yield q.get_nowait()
        except queue.Empty:
            return


def test_a_scopes_message_order_and_a_killed_listener_lose_nothing(tmp_path, stomp_broker, client):
    """Two pigeon connections (tiles and montage messages, as a camera and pyTEM send them); the
    listener is killed between a journal commit and its ACK and restarted; a tile.raw arrives after
    montage.complete; one tile montage.complete names never arrives; one tile images film only; the stage
    is turned 0.3 rad against the camera."""
    events: list[tuple[str, dict]] = []
    cfg = ScopeConfig(
        rows=3,
        columns=3,
        overlap=0.15,
        jitter_px=8.0,
        stage_rotation_rad=0.3,
        brightfield_frames=1,
        darkfield_frames=1,
        faults=("no_section:4",),
    )
    truth = simulate_montage(
        cfg, tmp_path / "tiles", lambda t, p: events.append((t, p)), sleep=lambda s: None
    )
    late, lost, killer = (truth.tile(*rc).tile_id for rc in ((1, 2), (2, 2), (0, 2)))
    url = f"sqlite:///{tmp_path / 'journal.sqlite'}"
    journal = Journal(url)
    heard = _heard(stomp_broker, "qc.tile", "qc.status", "tile.processed")
    b = stomp_broker
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_AFTER_COMMIT,
            url,
            b.host,
            str(b.port),
            b.subscription,
            b.topic_prefix,
            killer,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    restarted = None
    try:
        assert proc.stdout.readline().strip() == "ready"
        camera, pytem = b.pigeon("camera"), b.pigeon("pytem")  # two connections: no order across them
        pytem.send("montage.status", **events[0][1])
        wait_until(lambda: journal.montage(truth.montage_id), timeout=10, what="the montage journaled")
        publisher = BrokerSettings(b.host, b.port, topic_prefix=b.topic_prefix).publisher()
        source = JournalTileSource(
            journal, pixel_size_nm=4.0, rotation_rad=0.3, outbox=Outbox(publisher.publish_many)
        )
        done: dict = {}
        config = MontageRunConfig(poll_seconds=0.02, late_tile_seconds=1.5, status_every_seconds=1.0)
        run = threading.Thread(
            target=lambda: done.update(
                result=run_montage(
                    truth.montage_id, source, client, processed_url=str(tmp_path / "p.zarr"), config=config
                )
            )
        )
        run.start()
        held = {}
        for topic, payload in events[1:]:
            if topic == "tile.raw" and payload["tile_id"] in (late, lost):
                held[payload["tile_id"]] = payload
            elif topic == "tile.raw":
                camera.send(topic, **payload)
            else:  # montage.status, montage.complete
                if topic == "montage.complete":
                    assert proc.wait(timeout=30) == -signal.SIGKILL  # it died after committing the tile
                    restarted = ListenerThread(
                        b.host,
                        b.port,
                        journal,
                        subscription_name=b.subscription,
                        topic_prefix=b.topic_prefix,
                        backoff=(0.05, 0.5),
                    ).start()
                pytem.send(topic, **payload)
        wait_until(
            lambda: journal.montage(truth.montage_id).state == "completed",
            timeout=10,
            what="montage completed",
        )
        camera.send("tile.raw", **held[late])  # after montage.complete, on the other connection
        run.join(60)
        assert not run.is_alive()
        source.close()
        publisher.close()
        stats = restarted.finish()
    finally:
        if proc.poll() is None:
            proc.kill()
        if restarted is not None and restarted.thread.is_alive():
            restarted.stop.set()
    result = done["result"]

    # the journal holds every tile sent exactly once; the killed listener's last tile came back, once
    rows = [t for t in journal.tiles(truth.montage_id) if not t.is_reference]
    assert sorted(t.tile_id for t in rows) == sorted(t.tile_id for t in truth.tiles if t.tile_id != lost)
    assert stats.duplicates >= 1
    # every tile that arrived was judged, the late one too; the film-only tile is no tissue, not unfocused
    assert set(result.tiles) == {t.tile_id for t in rows}
    film = truth.tile(1, 1).tile_id
    assert [f.fault_type for f in result.qc.verdicts[film].faults] == ["no_tissue"]
    # the rotated stage centred every search (edges of the film-only tile are skipped, not failed)
    found = [m for r in result.tiles.values() for m in r.matches.values() if not (m and m.get("skipped"))]
    assert found and all(m and m["search"] == "stage" for m in found), found
    # the scope heard it all: qc.tile for every tile, tile.processed for each processed one, and a last
    # qc.status that stops it at the end, naming the lost tile
    got = _drain(
        heard,
        lambda g: (
            sum(t == "qc.tile" for t, _ in g) == len(rows)
            and g[-1][0] == "qc.status"
            and g[-1][1].status == "STOP_AT_END"
        ),
    )
    verdicts = {m.tile_id: m for t, m in got if t == "qc.tile"}
    assert set(verdicts) == set(result.tiles) and late in verdicts
    assert [f.fault_type for f in verdicts[film].faults] == ["no_tissue"]
    assert {m.tile_id for t, m in got if t == "tile.processed"} == set(result.tiles)
    last = [m for t, m in got if t == "qc.status"][-1]
    assert "tile_not_received at r2 c2" in last.reason
    assert result.not_received == {lost: (2, 2)}


def test_listener_and_verdicts_take_one_prefix_and_login(stomp_broker, tmp_path, monkeypatch, listener_log):
    """EM_BROKER, EM_BROKER_TOPIC_PREFIX and the login configure the listener and the verdict publisher
    alike (an ActiveMQ Artemis broker has another prefix); a wrong password is refused by both."""
    b = stomp_broker
    env = {
        "EM_BROKER": f"{b.host}:{b.port}",
        "EM_BROKER_TOPIC_PREFIX": b.topic_prefix,
        "EM_BROKER_USERNAME": "guest",
        "EM_BROKER_PASSWORD": "guest",
        "EM_DATA_ROOT": str(tmp_path / "data"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = BrokerSettings.from_env(env)
    journal = Journal(f"sqlite:///{tmp_path / 'j.sqlite'}")
    heard = _heard(b, "qc.status")
    listener = ListenerThread(
        settings.host,
        settings.port,
        journal,
        subscription_name=b.subscription,
        backoff=(0.05, 0.5),
        **settings.connection(),
    ).start()
    b.pigeon().send("montage.status", montage_id="m-env", state="started")
    wait_until(
        lambda: journal.montage("m-env"), timeout=10, what="the montage journaled under the configured prefix"
    )
    listener.finish()
    hardware = build_resources(env=env)["hardware"]
    hardware.send("qc.status", {"status": "GOOD", "reason": None}, montage_id="m-env")
    assert heard.get(timeout=20)[1].status == "GOOD"
    hardware.teardown_after_execution(None)

    wrong = BrokerSettings.from_env({**env, "EM_BROKER_PASSWORD": "wrong"})
    with pytest.raises(BrokerUnavailable, match="refused"):
        wrong.publisher(connect_attempts=1)
    logger, logs = listener_log
    refused = ListenerThread(
        wrong.host,
        wrong.port,
        journal,
        subscription_name=b.subscription,
        backoff=(0.05, 0.5),
        log=logger,
        **wrong.connection(),
    )
    refused.start(wait_ready=False)
    logs.wait_for("refused the connection")
    assert refused.finish().connections == 0


def _verdicts(result) -> dict:
    """Per tile: its fault types and, per neighbour, where the match put it (None: no overlap found)."""
    return {
        (r.tile.row, r.tile.column): (
            sorted(f.fault_type for f in result.qc.verdicts[r.tile.tile_id].faults),
            {p: m and (round(m["dX"]), round(m["dY"])) for p, m in sorted(r.matches.items())},
        )
        for r in result.tiles.values()
    }


class _BusyRun(JournalTileSource):
    """The run's view of the journal, which the test can hold still (a run busy elsewhere for a moment):
    while ``ready`` is clear, the run's next poll waits."""

    def __init__(self, journal):
        super().__init__(journal)  # no calibration configured: the pixel size comes with montage.complete
        self.ready = threading.Event()
        self.ready.set()

    def montage(self, montage_id):
        assert self.ready.wait(30), "the test never let the run poll again"
        return super().montage(montage_id)


def _live_montage(tmp_path, stomp_broker, client, events, restart_after: int | None):
    """Publish a scope's messages through the real broker to a listener and judge them live, the scope
    waiting for each tile's verdict before the next (a scope slower than the platform). With
    ``restart_after`` = k the listener stops after the k-th tile and the rest of the montage (tiles,
    montage.complete, montage.status) is sent while it is down; it is then started again, and the run
    polls once all of that is journaled."""
    b = stomp_broker
    tmp_path.mkdir()
    journal = Journal(f"sqlite:///{tmp_path / 'journal.sqlite'}")

    def listener():
        return ListenerThread(
            b.host,
            b.port,
            journal,
            subscription_name=b.subscription,
            topic_prefix=b.topic_prefix,
            backoff=(0.05, 0.5),
        ).start()

    listening = listener()
    scope = b.pigeon("pytem")
    montage_id = events[0][1]["montage_id"]
    scope.send("montage.status", **events[0][1])
    wait_until(lambda: journal.montage(montage_id), timeout=10, what="the montage journaled")
    done: dict = {}
    source = _BusyRun(journal)
    run = threading.Thread(
        target=lambda: done.update(
            result=run_montage(
                montage_id,
                source,
                client,
                processed_url=str(tmp_path / "p.zarr"),
                config=MontageRunConfig(poll_seconds=0.02, late_tile_seconds=5.0),
            )
        )
    )
    run.start()
    tiles = 0
    try:
        for topic, payload in events[1:]:
            scope.send(topic, **payload)
            if topic != "tile.raw" or payload["row"] < 0:
                continue
            tiles += 1
            if tiles == restart_after:
                listening.finish()
            if listening.thread.is_alive():
                wait_until(
                    lambda p=payload: any(
                        t.tile_id == p["tile_id"] and t.status != "acquired"
                        for t in journal.tiles(montage_id)
                    ),
                    30,
                    f"tile {payload['tile_id']} judged",
                )
        if restart_after is not None:
            assert journal.montage(montage_id).state == "in_progress"  # nothing of the rest journaled yet
            source.ready.clear()
            listening = listener()
            wait_until(
                lambda: journal.montage(montage_id).announced_complete, timeout=10, what="montage.complete"
            )
            source.ready.set()
        run.join(60)
        assert not run.is_alive(), "the montage run did not finish"
    finally:
        listening.finish()
    return done["result"]


def test_a_listener_restart_mid_montage_changes_no_verdict(tmp_path, stomp_broker, client):
    """The same montage judged live twice: once with the listener up throughout, once with the listener
    stopped after the third tile and restarted after the scope finished (the rest of the montage, and
    montage.complete with its pixel size, then arrive in one burst). No pixel size is configured, so live
    matching cannot use the stage positions: every tile must be judged the same way in both runs, however
    late montage.complete lands (the tiles judged after it used to be searched around the stage's place,
    with different verdicts)."""
    events: list[tuple[str, dict]] = []
    cfg = ScopeConfig(rows=3, columns=3, brightfield_frames=1, darkfield_frames=1)  # ±20 px stage jitter
    simulate_montage(cfg, tmp_path / "tiles", lambda t, p: events.append((t, p)), sleep=lambda s: None)
    steady = _live_montage(tmp_path / "steady", stomp_broker, client, events, restart_after=None)
    restarted = _live_montage(tmp_path / "restarted", stomp_broker, client, events, restart_after=3)
    assert steady.calibration.source == restarted.calibration.source == "none"
    assert _verdicts(restarted) == _verdicts(steady)
    assert (restarted.qc.status, restarted.qc.reason) == (steady.qc.status, steady.qc.reason)
