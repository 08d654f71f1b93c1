"""The simulated microscope obeys QC: STOP_NOW ends the acquisition at once, STOP_AT_END lets it finish."""

from __future__ import annotations

import json

from em_platform.simulation.scope import GROUND_TRUTH_FILE, simulate_montage
from em_platform.simulation.scope_config import ScopeConfig
from em_platform.tem.journal import Journal

SMALL = dict(
    rows=3, columns=3, tile_size=64, overlap=0.25, jitter_px=2.0, brightfield_frames=0, darkfield_frames=0
)


def _journal_scope(tmp_path, montage_id: str, verdict_after: int, status: str):
    """A scope writing to the journal; QC (played here) files ``status`` once ``verdict_after`` tiles are in."""
    journal = Journal(f"sqlite:///{tmp_path / 'journal.db'}")

    def emit(topic, payload):
        journal.record(topic, payload)
        if topic == "tile.raw" and len(journal.tiles(montage_id)) == verdict_after:
            journal.record_qc_status(montage_id, status, "3 saturated tiles in a row")

    def latest():
        statuses = journal.qc_statuses(montage_id)
        return statuses[-1] if statuses else None

    return journal, emit, latest


def test_stop_now_ends_the_montage_before_the_next_tile(tmp_path):
    journal, emit, latest = _journal_scope(tmp_path, "m-stop", verdict_after=4, status="STOP_NOW")
    truth = simulate_montage(
        ScopeConfig(**SMALL), tmp_path / "m", emit, montage_id="m-stop", qc_status=latest
    )

    assert len(journal.tiles("m-stop")) == 4  # the fifth tile was never taken
    topics = [m["topic"] for m in journal.messages(montage_id="m-stop")]
    assert "montage.complete" not in topics
    last = journal.messages("montage.status", montage_id="m-stop")[-1]
    assert last["state"] == "cancelled"
    assert "STOP_NOW" in last["error_message"] and "saturated" in last["error_message"]
    assert journal.montage("m-stop").finished

    taken = [t for t in truth.tiles if t.acquired]
    assert [t.raster_index for t in taken] == [0, 1, 2, 3]
    skipped = [t for t in truth.tiles if "not_acquired_qc_stop" in t.faults]
    assert [t.raster_index for t in skipped] == [4, 5, 6, 7, 8] and all(t.path is None for t in skipped)
    saved = json.loads((tmp_path / "m" / GROUND_TRUTH_FILE).read_text())
    assert saved["notes"]["stopped_by_qc"] == "STOP_NOW"


def test_stop_at_end_lets_the_montage_finish_and_is_recorded(tmp_path):
    journal, emit, latest = _journal_scope(tmp_path, "m-end", verdict_after=2, status="STOP_AT_END")
    truth = simulate_montage(ScopeConfig(**SMALL), tmp_path / "m", emit, montage_id="m-end", qc_status=latest)

    assert len(journal.tiles("m-end")) == 9 and all(t.acquired for t in truth.tiles)
    assert journal.messages("montage.status", montage_id="m-end")[-1]["state"] == "completed"
    assert truth.notes["qc_status"].startswith("STOP_AT_END")
    assert "stopped_by_qc" not in truth.notes


def test_good_status_changes_nothing(tmp_path):
    journal, emit, latest = _journal_scope(tmp_path, "m-good", verdict_after=1, status="GOOD")
    simulate_montage(ScopeConfig(**SMALL), tmp_path / "m", emit, montage_id="m-good", qc_status=latest)
    assert len(journal.tiles("m-good")) == 9
    assert journal.messages("montage.status", montage_id="m-good")[-1]["state"] == "completed"
