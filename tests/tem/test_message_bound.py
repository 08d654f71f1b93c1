"""A message body's size is bounded before anything reads it (issue 50, point 5): past the listener's bound
(EM_BROKER_MAX_MESSAGE_BYTES) a message is read past as it streams, dead-lettered with its first bytes, its
length and its SHA-256, acknowledged, and the listener goes on; the broker's own bound (RabbitMQ's
``max_message_size``, docker/rabbitmq/40-limits.conf) refuses it at the sender."""

from __future__ import annotations

import hashlib
import json

import pytest
import sqlalchemy as sa

from em_platform.catalog.dead_letters import KEPT_BODY_BYTES
from em_platform.settings import BROKER_MAX_MESSAGE_BYTES, ConfigError, broker_max_message_bytes
from em_platform.tem.journal import Journal
from tests.support.polling import wait_until


def _tile(montage_id: str, column: int, **extra) -> dict:
    return {
        "tile_id": f"{montage_id}-c{column}",
        "montage_id": montage_id,
        "row": 0,
        "column": column,
        "overlap": 51,
        "stage_position": [column * 1843, 0],
        "path": f"/storage/raw/{montage_id}/c{column}.tiff",
        **extra,
    }


@pytest.fixture
def journal(tmp_path):
    j = Journal(f"sqlite:///{tmp_path}/j.sqlite")
    yield j
    j.dispose()


def _letters(journal: Journal) -> list:
    with journal.engine.connect() as conn:
        return conn.execute(sa.text("SELECT * FROM dead_letters ORDER BY id")).mappings().all()


def test_an_oversized_message_is_dead_lettered_with_its_digest_and_the_next_is_journaled(
    stomp_broker, start_listener, journal, listener_log, monkeypatch
):
    _, logs = listener_log
    bound = 1 << 16  # the least the setting allows: this test sends 1.5 MB, not the default's 16 MiB
    monkeypatch.setenv("EM_BROKER_MAX_MESSAGE_BYTES", str(bound))
    lt = start_listener(journal)
    # a valid tile.raw the journal would take, but of 1.5 MB: larger than the bound and than a letter keeps
    big = json.dumps(_tile("m-big", 0, path="/storage/raw/" + "é" * 750_000 + ".tiff"), ensure_ascii=False)
    size = len(big.encode())
    stomp_broker.send_raw("tile.raw", big)
    stomp_broker.pigeon().send("tile.raw", **_tile("m-ok", 1))
    wait_until(lambda: journal.tiles("m-ok"), timeout=10, what="the tile after the oversized message")
    stats = lt.finish()
    assert (stats.received, stats.rejected, stats.journaled) == (2, 1, 1)
    assert journal.montage("m-big") is None  # refused before it was parsed or journaled

    [letter] = _letters(journal)
    assert (letter["source"], letter["topic"], letter["field"]) == ("broker", "tile.raw", "(body)")
    assert f"{size:,} bytes" in letter["reason"] and f"{bound:,} bytes" in letter["reason"]
    assert "EM_BROKER_MAX_MESSAGE_BYTES" in letter["reason"]
    assert letter["body_bytes"] == size and letter["body_sha256"] == hashlib.sha256(big.encode()).hexdigest()
    assert letter["body_truncated"]
    kept = letter["body"].encode()
    assert KEPT_BODY_BYTES - 1 <= len(kept) <= KEPT_BODY_BYTES and big.encode().startswith(kept)
    headers = letter["headers"]
    headers = json.loads(headers) if isinstance(headers, str) else headers
    assert headers["destination"] == f"{stomp_broker.topic_prefix}tile.raw"
    [logged] = logs.matching(r"rejected message .* is larger than the listener's limit")
    assert "sha256 " + letter["body_sha256"] in logged

    # acknowledged once kept: a fresh listener on the same durable queue receives only what comes next
    lt2 = start_listener(journal)
    stomp_broker.pigeon().send("tile.raw", **_tile("m-ok", 2))
    wait_until(lambda: len(journal.tiles("m-ok")) == 2, timeout=10, what="the marker tile")
    assert lt2.finish().received == 1
    assert [x["times"] for x in _letters(journal)] == [1]


def test_the_listener_bound_is_an_operator_setting(monkeypatch):
    assert broker_max_message_bytes({}) == BROKER_MAX_MESSAGE_BYTES == 16 << 20
    assert broker_max_message_bytes({"EM_BROKER_MAX_MESSAGE_BYTES": "33554432"}) == 32 << 20
    for bad in ("lots", "-1", "1024", "2.5"):
        with pytest.raises(ConfigError, match="EM_BROKER_MAX_MESSAGE_BYTES"):
            broker_max_message_bytes({"EM_BROKER_MAX_MESSAGE_BYTES": bad})
