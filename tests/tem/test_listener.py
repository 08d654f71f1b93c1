"""The journal listener against the real broker, fed by real pigeon clients: nothing lost, nothing doubled."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from em_platform.tem import listen_cli
from em_platform.tem.journal import Journal
from em_platform.tem.listener import delete_subscription, run_listener
from tests.support.metrics import scrape
from tests.support.polling import wait_until
from tests.support.ports import free_port

from .conftest import ListenerThread

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def journal(tmp_path):
    j = Journal(f"sqlite:///{tmp_path}/j.sqlite")
    yield j
    j.dispose()


def count(journal: Journal, table: str) -> int:
    with journal.engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()


def tile(montage_id: str, row: int, column: int, **extra) -> dict:
    return {
        "tile_id": f"{montage_id}-r{row}c{column}",
        "montage_id": montage_id,
        "row": row,
        "column": column,
        "overlap": 51,
        "stage_position": (column * 1843, row * 1843),
        "path": f"/storage/raw/{montage_id}/r{row}c{column}.tiff",
        **extra,
    }


def journaled(journal: Journal, n: int):
    return lambda: journal.high_water_mark() >= n


# -- the happy path ----------------------------------------------------------------------------------------


def test_pigeon_montage_is_journaled_in_order(stomp_broker, start_listener, journal):
    lt = start_listener(journal)
    scope = stomp_broker.pigeon("pytem")  # sends exactly what pyTEM would
    mid = f"m-{uuid.uuid4().hex[:8]}"
    tiles = [tile(mid, r, c) for r in range(2) for c in range(2)]
    scope.send("montage.status", montage_id=mid, state="started", total_tiles=4)
    for i, t in enumerate(tiles):
        scope.send("tile.raw", **t)
        scope.send("montage.status", montage_id=mid, state="in_progress", current_tile=i + 1, total_tiles=4)
    scope.send(
        "montage.complete",
        montage_id=mid,
        tiles={
            t["tile_id"]: {
                "raster_index": i,
                "stage_position": t["stage_position"],
                "raster_position": (t["column"], t["row"]),
            }
            for i, t in enumerate(tiles)
        },
        acquisition_id="acq-1",
        start_time=datetime.now(UTC),
        pixel_size=4.0,
        rotation_angle=0.61,
        aperture_centroid=(0, 0),
    )
    wait_until(journaled(journal, 10), timeout=10, what="10 messages journaled")
    stats = lt.finish()

    montage = journal.montage(mid)
    assert montage.state == "completed" and montage.total_tiles == 4 and montage.pixel_size_nm == 4.0
    rows = journal.tiles(mid)
    assert [(r.row, r.column, r.raster_index) for r in rows] == [(0, 0, 0), (0, 1, 1), (1, 0, 2), (1, 1, 3)]
    assert rows[0].stage_x_nm == 0 and rows[1].stage_x_nm == 1843 and rows[0].path.endswith("r0c0.tiff")
    # one queue for all topics: the journal sees the microscope's order, montage.complete last
    topics = [m["topic"] for m in journal.messages(montage_id=mid)]
    assert topics == ["montage.status"] + ["tile.raw", "montage.status"] * 4 + ["montage.complete"]
    assert (stats.journaled, stats.duplicates, stats.rejected, stats.connections) == (10, 0, 0, 1)
    assert count(journal, "acq_messages") == 10 and count(journal, "acq_tiles") == 4


# -- redelivery and durability -------------------------------------------------------------------------


def test_identical_message_twice_changes_nothing(stomp_broker, start_listener, journal):
    lt = start_listener(journal)
    scope = stomp_broker.pigeon()
    t = tile("m-dup", 0, 0)
    scope.send("tile.raw", **t)
    scope.send("tile.raw", **t)  # the same body again, as a redelivery would be
    scope.send("tile.raw", **tile("m-dup", 0, 1))
    wait_until(
        lambda: len(journal.tiles("m-dup")) == 2, timeout=10, what="both tiles"
    )  # the queue is ordered
    stats = lt.finish()
    assert (stats.received, stats.journaled, stats.duplicates) == (3, 2, 1)
    assert count(journal, "acq_messages") == 2 and count(journal, "acq_tiles") == 2


class CuttingJournal:
    """Commits, then the network drops before the listener can acknowledge (once, for one tile)."""

    def __init__(self, journal: Journal, proxy, tile_id: str):
        self.journal, self.proxy, self.tile_id = journal, proxy, tile_id
        self.cut = threading.Event()

    def record(self, topic, payload):
        new = self.journal.record(topic, payload)
        if payload.get("tile_id") == self.tile_id and not self.cut.is_set():
            self.cut.set()
            self.proxy.cut()
        return new


def test_connection_lost_between_commit_and_ack_is_redelivered_without_duplicates(
    stomp_broker, start_listener, journal, tcp_proxy, listener_log
):
    _, logs = listener_log
    sink = CuttingJournal(journal, tcp_proxy, "m-cut-r0c1")
    lt = start_listener(sink, port=tcp_proxy.port)
    scope = stomp_broker.pigeon()
    for c in range(3):
        scope.send("tile.raw", **tile("m-cut", 0, c))
    wait_until(lambda: len(journal.tiles("m-cut")) == 3, timeout=10, what="three tiles")
    logs.wait_for(r"already journaled \(redelivered=true\)")  # the unacknowledged tile came back
    stats = lt.finish()
    assert sink.cut.is_set() and tcp_proxy.accepted == 2 and stats.connections == 2
    assert logs.matching(r"lost the connection to the STOMP broker .*reconnecting in")
    assert stats.duplicates >= 1 and stats.journaled == 3
    assert count(journal, "acq_messages") == 3 and count(journal, "acq_tiles") == 3


def test_messages_sent_while_the_listener_is_down_are_journaled_after_restart(
    stomp_broker, start_listener, journal
):
    start_listener(journal).finish()  # the durable subscription now exists on the broker
    scope = stomp_broker.pigeon()
    scope.send("montage.status", montage_id="m-away", state="started", total_tiles=2)
    scope.send("tile.raw", **tile("m-away", 0, 0))
    scope.send("tile.raw", **tile("m-away", 0, 1))
    lt = start_listener(journal)
    wait_until(lambda: len(journal.tiles("m-away")) == 2, timeout=10, what="tiles sent while down")
    stats = lt.finish()
    assert stats.journaled == 3 and stats.duplicates == 0
    assert journal.montage("m-away").total_tiles == 2


def test_delete_subscription_drops_the_queue_and_its_messages(stomp_broker, start_listener, journal):
    start_listener(journal).finish()
    stomp_broker.pigeon().send("tile.raw", **tile("m-gone", 0, 0))  # kept by the broker for us...
    delete_subscription(
        stomp_broker.host,
        stomp_broker.port,
        stomp_broker.subscription,
        topic_prefix=stomp_broker.topic_prefix,
    )
    lt = start_listener(journal)  # ...until the subscription is deleted: a new, empty queue
    stomp_broker.pigeon().send("tile.raw", **tile("m-new", 0, 0))
    wait_until(lambda: journal.tiles("m-new"), timeout=10, what="the marker tile")
    stats = lt.finish()
    assert stats.received == 1 and journal.tiles("m-gone") == []


# -- bad messages and a bad journal ------------------------------------------------------------------------


def test_malformed_messages_are_logged_and_skipped(stomp_broker, start_listener, journal, listener_log):
    _, logs = listener_log
    lt = start_listener(journal)
    stomp_broker.send_raw("tile.raw", '{"tile_id": "t-bad", "montage_id": "m-bad"}', {"version": "9.9.9"})
    stomp_broker.send_raw("tile.raw", "this is not JSON")
    stomp_broker.send_raw("montage.status", '{"montage_id": "m-bad", "state": "exploded"}')
    stomp_broker.pigeon().send("tile.raw", **tile("m-ok", 0, 0))
    wait_until(lambda: journal.tiles("m-ok"), timeout=10, what="the valid tile after the bad ones")
    stats = lt.finish()
    assert (stats.received, stats.rejected, stats.journaled) == (4, 3, 1)
    [missing] = logs.matching(r"rejected tile\.raw .*'row'")
    assert "Field required" in missing and "9.9.9" in missing and "t-bad" in missing
    assert logs.matching(r"rejected tile\.raw .*undecodable|rejected tile\.raw .*frame body")
    assert logs.matching(r"rejected montage\.status .*'state'.*exploded")
    assert count(journal, "acq_messages") == 1

    # rejected means gone, not requeued: a fresh listener receives only the new marker
    lt2 = start_listener(journal)
    stomp_broker.pigeon().send("tile.raw", **tile("m-ok", 0, 1))
    wait_until(lambda: len(journal.tiles("m-ok")) == 2, timeout=10, what="the marker tile")
    assert lt2.finish().received == 1


class DownJournal:
    """A journal whose database is down for the first ``failures`` calls (forever with None)."""

    def __init__(self, journal: Journal | None, failures: int | None):
        self.journal, self.failures, self.calls = journal, failures, 0

    def record(self, topic, payload):
        self.calls += 1
        if self.failures is None or self.calls <= self.failures:
            raise sa.exc.OperationalError(
                "INSERT INTO acq_messages", {}, ConnectionRefusedError("database is down")
            )
        return self.journal.record(topic, payload)


def test_journal_outage_is_retried_and_the_message_is_not_acknowledged_meanwhile(
    stomp_broker, start_listener, journal, listener_log
):
    _, logs = listener_log
    lt = start_listener(DownJournal(None, None))  # the database is down
    stomp_broker.pigeon().send("tile.raw", **tile("m-db", 0, 0))
    logs.wait_for(r"could not record tile\.raw .*not acknowledged, retrying", count=3)
    stats = lt.finish()  # stopped while the database is still down: the message must stay on the broker
    assert stats.journal_errors >= 3 and stats.journaled == 0

    flaky = DownJournal(journal, failures=2)  # the database comes back after two more failures
    lt = start_listener(flaky)
    wait_until(lambda: journal.tiles("m-db"), timeout=10, what="the tile once the database is back")
    stats = lt.finish()
    assert (stats.journal_errors, stats.journaled, stats.duplicates) == (2, 1, 0)
    assert count(journal, "acq_messages") == 1


def test_a_message_the_journal_cannot_take_is_rejected_not_retried_forever(
    stomp_broker, start_listener, journal, listener_log
):
    _, logs = listener_log
    lt = start_listener(journal)
    scope = stomp_broker.pigeon()
    scope.send("tile.raw", **tile("m-conflict", 0, 0))
    scope.send("tile.raw", **tile("m-conflict", 0, 0, path="/elsewhere.tiff"))  # same tile_id, other body
    scope.send("tile.raw", **tile("m-conflict", 0, 1))
    wait_until(
        lambda: len(journal.tiles("m-conflict")) == 2, timeout=10, what="the tiles around the conflicting one"
    )
    stats = lt.finish()
    assert (stats.journaled, stats.rejected) == (2, 1)
    assert logs.matching(r"rejected tile\.raw .*the journal cannot record it \(IntegrityError")


# -- the broker away -------------------------------------------------------------------------------------


def test_unreachable_broker_is_retried_with_bounded_backoff_until_stopped(journal, listener_log):
    logger, logs = listener_log
    port = free_port()
    lt = ListenerThread("127.0.0.1", port, journal, backoff=(0.01, 0.04), log=logger).start(wait_ready=False)
    # each retry line names the socket's own error (a closed port: "[Errno 111] Connection refused")
    messages = logs.wait_for(
        rf"cannot connect to the STOMP broker at 127\.0\.0\.1:{port}: \S[^()]*refused[^()]* \(attempt \d+\); "
        r"retrying in",
        count=5,
    )
    delays = [float(re.search(r"retrying in ([\d.e-]+) s", m)[1]) for m in messages[:5]]
    assert delays == [0.01, 0.02, 0.04, 0.04, 0.04]  # doubling, capped
    assert [int(re.search(r"attempt (\d+)", m)[1]) for m in messages[:5]] == [1, 2, 3, 4, 5]
    stats = lt.finish(timeout=5)
    assert stats.connections == 0 and stats.connect_failures >= 5 and not lt.ready.is_set()


def test_stop_ends_a_listener_that_waits_out_a_long_backoff(journal):
    stop = threading.Event()
    done = threading.Event()
    result = {}

    def run():
        result["stats"] = run_listener("127.0.0.1", free_port(), journal, stop=stop, backoff=(60, 60))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    stop.set()
    assert done.wait(5), "stop did not interrupt the 60 s backoff"
    assert result["stats"].connections == 0


def test_bad_subscription_name_is_refused(journal):
    with pytest.raises(ValueError, match="queue name"):
        run_listener("127.0.0.1", 1, journal, stop=threading.Event(), subscription_name="amq.mine")


# -- em-platform listen ------------------------------------------------------------------------------------


def _parse(argv):
    parser = argparse.ArgumentParser()
    listen_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_listen_cli_refuses_a_bad_broker_spec(capsys):
    assert listen_cli.run(_parse(["--broker", "localhost"]), lambda: pytest.fail("journal opened")) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    args = _parse(["--broker", "127.0.0.1:61613", "--subscription", "has space"])
    assert listen_cli.run(args, lambda: pytest.fail("journal opened")) == 2


def test_listen_cli_journals_until_sigterm(stomp_broker, tmp_path):
    db = tmp_path / "cli.sqlite"
    script = (
        "import sys; from em_platform.tem import listen_cli; from em_platform.tem.journal import Journal\n"
        "import argparse; p = argparse.ArgumentParser(); listen_cli.add_arguments(p)\n"
        f"journal = lambda: Journal({f'sqlite:///{db}'!r}, tile_shares=['/storage/raw'])\n"
        "sys.exit(listen_cli.run(p.parse_args(sys.argv[1:]), journal))\n"
    )
    metrics = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            script,
            "--broker",
            f"{stomp_broker.host}:{stomp_broker.port}",
            "--subscription",
            stomp_broker.subscription,
            "--topic-prefix",
            stomp_broker.topic_prefix,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "EM_LISTENER_METRICS": metrics},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        subscribed = threading.Event()
        err_lines: list[str] = []

        def read_stderr():
            for line in proc.stderr:
                err_lines.append(line)
                if "subscribed to" in line:
                    subscribed.set()

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        assert subscribed.wait(30), "".join(err_lines)
        stomp_broker.pigeon().send("tile.raw", **tile("m-cli", 0, 0))
        journal = Journal(f"sqlite:///{db}")
        try:
            wait_until(
                lambda: journal.tiles("m-cli"), timeout=10, what="the tile journaled by em-platform listen"
            )
        finally:
            journal.dispose()
        # what an operator's Prometheus reads: the tile by its scope share, a dead letter by its reason
        stomp_broker.send_raw("tile.raw", "this is not JSON")
        letters = ("em_dead_letters_total", (("reason", "protocol"),))
        wait_until(
            lambda: scrape(f"http://{metrics}/metrics").get(letters),
            timeout=10,
            what="the dead letter counted",
        )
        samples = scrape(f"http://{metrics}/metrics")
        assert samples[("em_tiles_received_total", (("scope", "raw"),))] == 1
        assert samples[letters] == 1
        assert samples[("em_broker_connected", (("service", "listener"),))] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, "".join(err_lines)
        reader.join(5)
        out = proc.stdout.read()
        assert "stopped; 1 new message(s) journaled" in out
        assert any("received SIGTERM" in line for line in err_lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
