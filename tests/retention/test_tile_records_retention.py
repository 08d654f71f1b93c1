"""Letting go of archived montages' tile records (``EM_RETAIN_TILE_RECORDS_DAYS``, default forever), on SQLite
and PostgreSQL: theirs go, another montage's stay whole, and a second time deletes nothing."""

from __future__ import annotations

import pytest

from em_platform.tem.tile_records import TileRecord, TileRecords


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    return request.getfixturevalue("pg_url")


def _records(montage_id: str, n: int) -> list[TileRecord]:
    return [
        TileRecord(f"{montage_id}_{i}", montage_id, 0, i, f"s3://b/{montage_id}/{i}", focus_score=0.1)
        for i in range(n)
    ]


def test_an_archived_montages_tile_records_go_and_no_other(url):
    records = TileRecords(url)
    records.replace_montage("old", _records("old", 3))
    records.replace_montage("kept", _records("kept", 2))
    kept = records.montage_tiles("kept")
    many = ["old", *(f"never-recorded-{i}" for i in range(700))]  # more ids than one statement takes

    assert records.forget_montages(many) == 3
    assert records.montage_tiles("old") == [] and records.montage_tiles("kept") == kept
    assert records.forget_montages(many) == 0
    records.dispose()
