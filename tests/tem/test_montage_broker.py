"""QC verdicts reach the microscope over the real STOMP broker while the montage runs through Dagster."""

from __future__ import annotations

import queue

import dagster as dg
import TEM_comms

from em_platform.resources import BrokerScope
from em_platform.simulation.scope import simulate_montage
from em_platform.simulation.scope_config import ScopeConfig
from em_platform.tem.journal import Journal
from tests.support.platform import make_platform


def _subscribe(stomp_broker, topic: str) -> queue.Queue:
    received: queue.Queue = queue.Queue()
    client = stomp_broker.pigeon("pytem")
    client.subscribe(topic, lambda msg, topic, headers: received.put(msg))
    stomp_broker.sync(client)
    return received


def _drain(q: queue.Queue) -> list:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


def test_critical_fault_publishes_stop_now_on_the_broker(tmp_path, stomp_broker):
    statuses = _subscribe(stomp_broker, "qc.status")
    verdicts = _subscribe(stomp_broker, "qc.tile")
    platform = make_platform(tmp_path)
    journal = Journal(platform.settings.catalog_url)
    cfg = ScopeConfig(rows=2, columns=3, overlap=0.15, jitter_px=6.0, faults=("saturated:4",))
    truth = simulate_montage(cfg, tmp_path / "tiles", journal.record, sleep=lambda s: None)
    hardware = BrokerScope(
        journal_url=platform.settings.catalog_url,
        broker=f"{stomp_broker.host}:{stomp_broker.port}",
        topic_prefix=stomp_broker.topic_prefix,
        tile_shares=list(platform.settings.scope_shares),
    )
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("montages", [truth.montage_id])
        result = platform.defs.resolve_job_def("montage_job").execute_in_process(
            instance=instance,
            partition_key=truth.montage_id,
            resources={"hardware": hardware},
            raise_on_error=False,
        )
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["saturated_tiles"] is False and checks["focus"] is True
    first = statuses.get(timeout=20)
    received = [first, *_drain(statuses)]
    assert all(isinstance(m, TEM_comms.qc.Status) for m in received)
    assert received[-1].status == "STOP_NOW" and "saturated" in received[-1].reason
    tiles = [verdicts.get(timeout=20)]
    while len(tiles) < 6:
        tiles.append(verdicts.get(timeout=20))
    bad = [m for m in tiles if not m.passed]
    assert [(m.row, m.column) for m in bad] == [(1, 1)]
    assert [(f.fault_type, f.scope) for f in bad[0].faults] == [("saturated", "critical")]


def test_the_simulated_scope_hears_stop_now_on_the_broker(tmp_path, stomp_broker):
    """scope-sim behind a broker: a STOP_NOW published by QC reaches it and ends the montage there."""
    from em_platform.tem.broker import BrokerPublisher

    qc = stomp_broker.pigeon("qc-service")
    heard: queue.Queue = queue.Queue()
    latest: list = []
    raw = _subscribe(stomp_broker, "tile.raw")
    with BrokerPublisher(
        stomp_broker.host, stomp_broker.port, topic_prefix=stomp_broker.topic_prefix
    ) as scope:
        scope.subscribe("qc.status", lambda msg: (latest.append((msg.status, msg.reason)), heard.put(msg)))
        # confirmed (RECEIPT) after the SUBSCRIBE on the same connection, so the subscription is in place
        scope.publish("qc.status", {"status": "GOOD"})
        heard.get(timeout=20)

        def emit(topic, payload):
            scope.publish(topic, payload)
            if topic == "tile.raw" and payload["row"] == 0 and payload["column"] == 2:
                qc.send("qc.status", status="STOP_NOW", reason="critical: saturated")
                heard.get(timeout=20)  # the scope has heard it before it moves the stage again

        truth = simulate_montage(
            ScopeConfig(
                rows=2,
                columns=3,
                tile_size=64,
                overlap=0.25,
                jitter_px=2.0,
                brightfield_frames=0,
                darkfield_frames=0,
            ),
            tmp_path / "tiles",
            emit,
            sleep=lambda s: None,
            qc_status=lambda: latest[-1] if latest else None,
        )
    assert [t.acquired for t in truth.tiles] == [True, True, True, False, False, False]
    assert truth.notes["stopped_by_qc"] == "STOP_NOW"
    assert len(_drain(raw)) == 3  # the broker saw no tile after the stop


def test_upload_reports_buffer_status_on_the_broker(tmp_path, stomp_broker):
    buffer = _subscribe(stomp_broker, "buffer.status")
    platform = make_platform(tmp_path)
    journal = Journal(platform.settings.catalog_url)
    cfg = ScopeConfig(rows=2, columns=2, overlap=0.15, jitter_px=6.0)
    truth = simulate_montage(cfg, tmp_path / "tiles", journal.record, sleep=lambda s: None)
    hardware = BrokerScope(
        journal_url=platform.settings.catalog_url,
        broker=f"{stomp_broker.host}:{stomp_broker.port}",
        topic_prefix=stomp_broker.topic_prefix,
        tile_shares=list(platform.settings.scope_shares),
    )
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("montages", [truth.montage_id])
        result = platform.defs.resolve_job_def("montage_job").execute_in_process(
            instance=instance, partition_key=truth.montage_id, resources={"hardware": hardware}
        )
    assert result.success
    reports = [buffer.get(timeout=20)]
    while reports[-1].queue_length:
        reports.append(buffer.get(timeout=20))
    assert all(isinstance(m, TEM_comms.buffer.Status) for m in reports)
    assert reports[-1].queue_length == 0 and reports[-1].free_space > 0
