"""Dead letters keep at most KEPT_BODY_BYTES of a body, with the length and SHA-256 of the whole (issue 50,
point 5: they kept whole bodies), on SQLite and on the local PostgreSQL server; a table made by the first
release gains the new columns in place, its rows intact; the operator's CLI says what was cut."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from em_platform.catalog.dead_letters import KEPT_BODY_BYTES, DeadLetters, LetterBody
from em_platform.cli import main
from em_platform.tem.journal import Journal


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    return request.getfixturevalue("pg_url")


def _row(url: str, letter_id: int) -> dict:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.text("SELECT * FROM dead_letters WHERE id = :i"), {"i": letter_id})
            return dict(row.mappings().one())
    finally:
        engine.dispose()


def test_a_large_body_is_kept_cut_with_the_length_and_digest_of_the_whole(url):
    body = '{"tile_id": "t-1", "path": "/storage/' + "ü" * (2 * KEPT_BODY_BYTES) + '.tiff"}'
    whole = body.encode()
    letters = DeadLetters(url)
    try:
        first = letters.add(
            source="broker", topic="tile.raw", field="path", reason="off the share", body=body
        )
        row = _row(url, first)
        kept = row["body"].encode()
        assert (
            len(body[:37].encode()) == 37
        )  # so the cut falls inside a 2-byte "ü": left out, text stays whole
        assert len(kept) == KEPT_BODY_BYTES - 1
        assert whole.startswith(kept) and len(kept) < len(whole)
        assert row["body_bytes"] == len(whole) and row["body_truncated"]
        assert row["body_sha256"] == hashlib.sha256(whole).hexdigest()

        # the same message again is the same letter (its key is the whole body's), counted, not stored twice
        again = letters.add(
            source="broker", topic="tile.raw", field="path", reason="off the share", body=body
        )
        assert again == first and _row(url, first)["times"] == 2

        small = letters.add(
            source="inbox", topic="ingest/local", field="entry", reason="outside", body="/in/x"
        )
        row = _row(url, small)
        assert (row["body"], row["body_bytes"], row["body_truncated"]) == ("/in/x", 5, False)
        assert row["body_sha256"] == hashlib.sha256(b"/in/x").hexdigest()

        [cut, whole_letter] = letters.letters()
        assert cut.body_truncated and not whole_letter.body_truncated
        assert f"body truncated: first {KEPT_BODY_BYTES - 1:,} of {len(whole):,} bytes kept" in cut.line()
        assert cut.body_sha256 in cut.line() and "truncated" not in whole_letter.line()
    finally:
        letters.dispose()


def test_the_journal_keeps_a_body_the_listener_read_past_by_its_digest(url):
    head = b'{"tile_id": "t-9", ' + b"x" * (KEPT_BODY_BYTES + 10)
    body = LetterBody.cut(head, length=50_000_000, sha256="ab" * 32)
    journal = Journal(url)
    try:
        letter = journal.dead_letter("broker", "tile.raw", "(body)", "too large", body, {"ack": "1"})
        row = _row(url, letter)
        assert len(row["body"]) == KEPT_BODY_BYTES and row["body"].startswith('{"tile_id": "t-9"')
        assert (row["body_bytes"], row["body_sha256"], row["body_truncated"]) == (50_000_000, "ab" * 32, True)
        assert journal.dead_letter("broker", "tile.raw", "(body)", "too large", body, None) == letter
    finally:
        journal.dispose()


def test_a_table_of_the_first_release_gains_the_columns_and_keeps_its_rows(url):
    """The catalog is made by create_all (no migration tool): a missing table is made, a missing column is
    not, so the new columns are added where an earlier release's table lacks them."""
    old = sa.MetaData()
    sa.Table(  # dead_letters as the first release made it
        "dead_letters",
        old,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("letter_key", sa.String(64), nullable=False, unique=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("topic", sa.String(200), nullable=False),
        sa.Column("field", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("headers", sa.JSON),
        sa.Column("first_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("times", sa.Integer, nullable=False),
        sa.Column("cleared_at", sa.DateTime(timezone=True), index=True),
        sa.Column("resolution", sa.Text),
    )
    engine = sa.create_engine(url)
    now = datetime.now(UTC)
    try:
        old.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                old.tables["dead_letters"].insert().values(
                    letter_key="k" * 64, source="broker", topic="tile.raw", field="path", reason="old",
                    body='{"old": true}', first_at=now, last_at=now, times=1,
                )
            )  # fmt: skip
    finally:
        engine.dispose()

    for _ in range(2):  # opened again (a second process, the next start): nothing to add, nothing fails
        letters = DeadLetters(url)
        try:
            [kept] = [x for x in letters.letters() if x.reason == "old"]
            assert (kept.body, kept.body_bytes, kept.body_truncated) == ('{"old": true}', 13, False)
            assert kept.body_sha256 == hashlib.sha256(b'{"old": true}').hexdigest()
            new = letters.add(
                source="broker", topic="tile.raw", field="(body)", reason="big", body="y" * 2_000_000
            )
            assert _row(url, new)["body_truncated"] and _row(url, new)["body_bytes"] == 2_000_000
        finally:
            letters.dispose()
    assert {c["name"] for c in sa.inspect(sa.create_engine(url)).get_columns("dead_letters")} >= {
        "body_bytes",
        "body_sha256",
        "body_truncated",
    }


def test_the_cli_says_a_letter_was_cut_and_will_not_replay_it(tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    for name, value in {"EM_DATA_ROOT": str(tmp_path / "data"), "EM_CATALOG_URL": url}.items():
        monkeypatch.setenv(name, value)
    body = '{"tile_id": "t-1", "montage_id": "m-1", "path": "' + "z" * (KEPT_BODY_BYTES + 500) + '"}'
    journal = Journal(url)
    try:
        journal.dead_letter("broker", "tile.raw", "path", "not under a scope share", body, {"ack": "1"})
    finally:
        journal.dispose()
    digest = hashlib.sha256(body.encode()).hexdigest()
    assert main(["dead-letters"]) == 0
    out = capsys.readouterr().out
    assert f"body truncated: first {KEPT_BODY_BYTES:,} of {len(body):,} bytes kept, sha256 {digest}" in out
    assert main(["dead-letters", "--json"]) == 0
    assert f'"body_sha256": "{digest}"' in capsys.readouterr().out
    assert main(["dead-letters", "--replay", "1"]) == 1  # half a message is not journaled
    out = capsys.readouterr().out
    assert "#1 tile.raw: cannot replay, only part of it was kept" in out and "send it again" in out
