"""The TEM_comms protocol layer: validation, broker addresses, and publishing that real pigeon clients read."""

from __future__ import annotations

import json
import queue
from datetime import UTC, datetime

import pytest
import TEM_comms
from pigeon import Pigeon

from em_platform.tem.broker import (
    BrokerPublisher,
    BrokerSpecError,
    BrokerUnavailable,
    normalize_prefix,
    parse_broker,
    topic_of,
)
from em_platform.tem.protocol import CONSUMED, PUBLISHED, ProtocolError, decode, message_version, validate
from tests.support.polling import wait_until
from tests.support.ports import free_port

TILE = {
    "tile_id": "69005602-15b0-4407-bf5b-4bddd6629141",
    "montage_id": "4330c7cf-e45b-4950-89cf-82dc0f815fe9",
    "row": 5,
    "column": 24,
    "overlap": 512,
    "stage_position": (100_000, -50_000),
}


# -- topics and validation --------------------------------------------------------------------------------


def test_topics_match_the_installed_tem_comms():
    assert CONSUMED[:1] == ("tile.raw",)
    assert {"tile.raw", "montage.status", "montage.complete"} <= set(CONSUMED)
    assert ("montage.start" in CONSUMED) == ("montage.start" in TEM_comms.topics)  # absent from TEM_comms 2.7
    assert set(CONSUMED) <= set(TEM_comms.topics)
    assert set(PUBLISHED) <= set(TEM_comms.topics), set(PUBLISHED) - set(TEM_comms.topics)
    assert "qc.status" in PUBLISHED and "qc.tile" in PUBLISHED and "buffer.status" in PUBLISHED


def test_validate_returns_the_json_ready_message():
    out = validate("tile.raw", {**TILE, "path": "/storage/raw/t.tiff", "brightfield": True})
    assert out["stage_position"] == [100_000, -50_000]  # tuple -> JSON array
    assert out["darkfield"] is False and out["lens_correction"] is False  # model defaults filled in
    assert json.loads(json.dumps(out)) == out
    status = validate("montage.status", {"montage_id": "m1", "state": "in_progress", "current_tile": 3})
    assert status["state"] == "in_progress"  # enum -> value
    start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    complete = validate(
        "montage.complete",
        {
            "montage_id": "m1",
            "tiles": {"t1": {"raster_index": 0, "stage_position": (1, 2), "raster_position": (0, 0)}},
            "acquisition_id": "acq-1",
            "start_time": start,
            "pixel_size": 4.0,
            "rotation_angle": 0.61,
            "aperture_centroid": (0, 0),
        },
    )
    assert complete["start_time"].startswith("2026-01-02T03:04:05")
    # a model instance is accepted as well
    assert validate("qc.status", TEM_comms.qc.Status(status="GOOD")) == {"status": "GOOD", "reason": None}


@pytest.mark.parametrize(
    ("topic", "payload", "field", "words"),
    [
        ("qc.status", {"status": "MAYBE"}, "status", "GOOD"),
        ("tile.raw", {k: v for k, v in TILE.items() if k != "row"}, "row", "Field required"),
        ("tile.raw", {**TILE, "row": "five", "path": "/p"}, "row", "integer"),
        ("tile.raw", {**TILE, "path": "/p", "exposure": 3}, "exposure", "Extra inputs"),
        ("tile.statistics.focus", {**TILE, "focus": 1.5}, "focus", "less than or equal"),
        (
            "qc.tile",
            {**TILE, "passed": False, "faults": [{"fault_type": "blank"}]},
            "faults.0.severity",
            "required",
        ),
    ],
)
def test_invalid_payload_names_topic_and_field(topic, payload, field, words):
    with pytest.raises(ProtocolError) as info:
        validate(topic, payload)
    err = info.value
    assert err.topic == topic
    assert field in err.fields
    assert topic in str(err) and repr(field) in str(err) and words in str(err)


def test_unknown_topic_and_non_mapping_are_protocol_errors():
    with pytest.raises(ProtocolError, match="unknown TEM_comms topic 'tile.rwa'"):
        validate("tile.rwa", {})
    with pytest.raises(ProtocolError, match="mapping"):
        validate("qc.status", ["GOOD"])


def test_decode_has_pigeons_semantics():
    body = TEM_comms.tile.Raw(**TILE, path="/storage/raw/t.tiff").serialize()  # what pigeon puts on the wire
    assert decode("tile.raw", body) == validate("tile.raw", json.loads(body))
    assert decode("tile.raw", body.encode()) == decode("tile.raw", body)
    with pytest.raises(ProtocolError, match="tile.raw frame body") as info:
        decode("tile.raw", "not json")
    assert info.value.topic == "tile.raw"
    with pytest.raises(ProtocolError) as info:
        decode("tile.raw", json.dumps({"tile_id": "x"}))
    assert {"montage_id", "row", "column", "overlap", "path"} <= set(info.value.fields)


def test_message_version_is_pigeons_version_header():
    from importlib.metadata import version

    assert message_version("qc.status") == version("pigeon-tem-comms")


# -- broker addresses ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("127.0.0.1:61613", ("127.0.0.1", 61613)),
        ("broker:61616", ("broker", 61616)),
        (" rabbit.example.org:1 ", ("rabbit.example.org", 1)),
        ("[::1]:61613", ("::1", 61613)),
    ],
)
def test_parse_broker(spec, expected):
    assert parse_broker(spec) == expected


@pytest.mark.parametrize(
    "spec", ["", "localhost", ":61613", "host:", "host:port", "host:70000", "a b:1", "::1:61613"]
)
def test_parse_broker_rejects_bad_specs(spec):
    with pytest.raises(BrokerSpecError, match="HOST:PORT|port"):
        parse_broker(spec)


def test_prefix_rule_is_pigeons():
    assert normalize_prefix("/topic/") == "/topic/"
    assert normalize_prefix("em") == "em."
    assert normalize_prefix("") == ""
    assert topic_of("/topic/tile.raw") == "tile.raw"
    assert topic_of("/topic/ns.tile.raw", "/topic/ns") == "tile.raw"
    assert topic_of("/queue/tile.raw") is None


# -- publishing --------------------------------------------------------------------------------------------


def test_publisher_rejects_an_invalid_payload_before_sending():
    publisher = BrokerPublisher("127.0.0.1", free_port(), lazy=True)  # never connects: validation comes first
    with pytest.raises(ProtocolError) as info:
        publisher.publish("qc.status", {"status": "STOP_SOMETIME"})
    assert info.value.fields == ("status",) and "qc.status" in str(info.value)
    assert not publisher.connected


def test_publisher_names_the_unreachable_broker():
    port = free_port()
    with pytest.raises(BrokerUnavailable) as info:
        BrokerPublisher("127.0.0.1", port, connect_attempts=3, backoff=(0.01, 0.02))
    assert f"127.0.0.1:{port}" in str(info.value) and "3 attempts" in str(info.value)


def _subscriber(stomp_broker, topic: str) -> tuple[Pigeon, queue.Queue]:
    received: queue.Queue = queue.Queue()
    client = stomp_broker.pigeon("qc-reader")
    client.subscribe(topic, lambda msg, topic, headers: received.put((msg, topic, headers)))
    stomp_broker.sync(client)  # the SUBSCRIBE is in force before anything is published
    return client, received


def test_published_qc_status_reaches_a_pigeon_subscriber(stomp_broker):
    _, received = _subscriber(stomp_broker, "qc.status")
    with BrokerPublisher(stomp_broker.host, stomp_broker.port, topic_prefix=stomp_broker.topic_prefix) as pub:
        sent = pub.publish(
            "qc.status", {"status": "STOP_AT_END", "reason": "3 persistent out-of-focus tiles"}
        )
    msg, topic, headers = received.get(timeout=10)
    assert isinstance(msg, TEM_comms.qc.Status)
    assert (msg.status, msg.reason) == ("STOP_AT_END", "3 persistent out-of-focus tiles")
    assert topic == "qc.status" and sent == msg.model_dump(mode="json")
    assert headers["service"] == "em_platform" and headers["version"] == message_version("qc.status")
    assert headers["destination"] == f"{stomp_broker.topic_prefix}qc.status"


def test_published_qc_tile_with_faults_reaches_a_pigeon_subscriber(stomp_broker):
    _, received = _subscriber(stomp_broker, "qc.tile")
    fault = {"fault_type": "out_of_focus", "severity": 0.8, "confidence": 0.9, "scope": "persistent"}
    with BrokerPublisher(stomp_broker.host, stomp_broker.port, topic_prefix=stomp_broker.topic_prefix) as pub:
        pub.publish("qc.tile", {**TILE, "passed": False, "faults": [fault]})
    msg, _, _ = received.get(timeout=10)
    assert isinstance(msg, TEM_comms.qc.Tile) and msg.passed is False
    assert msg.faults[0].scope == "persistent" and msg.tile_id == TILE["tile_id"]


def test_publisher_reconnects_after_the_connection_is_cut(stomp_broker, tcp_proxy):
    _, received = _subscriber(stomp_broker, "qc.status")
    pub = BrokerPublisher(
        "127.0.0.1", tcp_proxy.port, topic_prefix=stomp_broker.topic_prefix, backoff=(0.05, 0.2)
    )
    try:
        pub.publish("qc.status", {"status": "GOOD"})
        assert received.get(timeout=10)[0].status == "GOOD"
        tcp_proxy.cut()  # the network drops every connection to the broker
        pub.publish("qc.status", {"status": "STOP_NOW", "reason": "blank tiles"})
        assert received.get(timeout=10)[0].status == "STOP_NOW"
        assert tcp_proxy.accepted == 2
        wait_until(lambda: pub.connected, timeout=10, what="publisher connected")
    finally:
        pub.close()
