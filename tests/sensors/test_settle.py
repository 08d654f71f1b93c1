"""The sensors' settle loop (em_platform.sensors.settle) on plain entries: what a tick requests, holds back,
dead-letters, and leaves in the cursor."""

from __future__ import annotations

import json

from em_platform.sensors.settle import WatchedEntry, settle_entries


def _entry(key: str, fp: str, *, settled: bool = True, refused: bool = False) -> WatchedEntry[dict]:
    return WatchedEntry(key, fp, {"key": key, "settled": settled}, refused=refused)


def _settled(item: dict) -> bool:
    return item["settled"]


def test_a_tick_requests_the_new_and_changed_and_skips_the_unchanged():
    cursor = json.dumps({"same": "a1", "grown": "b1", "gone": "c1"})  # a cursor the sensors wrote before
    tick = settle_entries(
        cursor, [_entry("same", "a1"), _entry("grown", "b2"), _entry("new", "d1")], settled=_settled, limit=10
    )
    assert [w.key for w in tick.requested] == ["grown", "new"]
    assert [w.fingerprint for w in tick.requested] == ["b2", "d1"]
    # a removed entry leaves the cursor (it is requested again if it comes back); sorted keys, as before
    assert tick.cursor_json() == json.dumps({"grown": "b2", "new": "d1", "same": "a1"}, sort_keys=True)


def test_an_entry_still_being_written_waits_with_its_old_fingerprint():
    tick = settle_entries(
        json.dumps({"x": "1"}), [_entry("x", "2", settled=False)], settled=_settled, limit=10
    )
    assert tick.requested == [] and tick.waiting == ["x"] and tick.cursor == {"x": "1"}
    asked = []
    settle_entries(json.dumps({"x": "1"}), [_entry("x", "1")], settled=asked.append, limit=10)
    assert asked == []  # an unchanged entry's files are not looked at


def test_a_refused_entry_is_handed_back_once_until_it_changes():
    first = settle_entries(None, [_entry("bad", "f1", refused=True)], settled=_settled, limit=10)
    assert [w.key for w in first.refused] == ["bad"] and first.requested == []
    again = settle_entries(
        first.cursor_json(), [_entry("bad", "f1", refused=True)], settled=_settled, limit=10
    )
    assert again.refused == []
    changed = settle_entries(
        first.cursor_json(), [_entry("bad", "f2", refused=True)], settled=_settled, limit=10
    )
    assert [w.fingerprint for w in changed.refused] == ["f2"]


def test_the_limit_leaves_the_rest_for_the_next_tick():
    entries = [_entry(f"e{i}", "1") for i in range(5)]
    tick = settle_entries(None, entries, settled=_settled, limit=2)
    assert [w.key for w in tick.requested] == ["e0", "e1"] and set(tick.cursor) == {"e0", "e1"}
    rest = settle_entries(tick.cursor_json(), entries, settled=_settled, limit=2)
    assert [w.key for w in rest.requested] == ["e2", "e3"]
