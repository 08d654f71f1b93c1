"""QC rules: each fault with its scope, escalation of runs, and the run-level status."""

from __future__ import annotations

from em_platform.tem.qc import (
    BLANK,
    MISSING,
    NO_MATCH,
    OUT_OF_FOCUS,
    SATURATED,
    UNREADABLE,
    MontageQC,
    QCConfig,
    tile_faults,
)

CFG = QCConfig()


def _stats(std=30.0, saturated=0.0, n=10_000):
    hist = [0] * 256
    hist[-1] = int(saturated * n)
    hist[128] = n - hist[-1]
    return {"std_float": std, "mean": 128.0, "histogram": hist}


GOOD_MATCH = {"position": "top", "quality": 0.9}


def test_clean_tile_has_no_fault():
    assert tile_faults(_stats(), 0.2, [GOOD_MATCH], CFG) == []


def test_each_fault_and_its_scope():
    [blank] = tile_faults(_stats(std=1.0), 0.99, [None], CFG)  # a blank tile is not also unfocused/unmatched
    assert (blank.fault_type, blank.scope) == (BLANK, "transient")
    [sat] = tile_faults(_stats(saturated=0.05), 0.2, [GOOD_MATCH], CFG)
    assert (sat.fault_type, sat.scope) == (SATURATED, "transient")
    [burn] = tile_faults(_stats(saturated=0.8), 0.2, [GOOD_MATCH], CFG)
    assert (burn.fault_type, burn.scope) == (SATURATED, "critical")
    [blur] = tile_faults(_stats(), 0.9, [GOOD_MATCH], CFG)
    assert (blur.fault_type, blur.scope) == (OUT_OF_FOCUS, "transient")
    [nomatch] = tile_faults(_stats(), 0.2, [None], CFG)
    assert nomatch.fault_type == NO_MATCH
    [weak] = tile_faults(_stats(), 0.2, [{"position": "left", "quality": 0.1}], CFG)
    assert weak.fault_type == NO_MATCH and weak.metrics["position"] == "left"
    [bad] = tile_faults(None, None, [], CFG, error="t.tif is truncated")
    assert (bad.fault_type, bad.scope) == (UNREADABLE, "transient")
    assert 0 <= blank.message()["severity"] <= 1 and blank.message()["scope"] == "transient"


def test_clean_montage_is_good():
    qc = MontageQC()
    for i in range(20):
        assert qc.add(f"t{i}", i // 5, i % 5, []).passed
    assert qc.status == "GOOD" and qc.summary()["faults"] == {}


def test_single_transient_faults_keep_imaging():
    qc = MontageQC()
    qc.add("a", 0, 0, tile_faults(_stats(std=1.0), None, [], CFG))
    qc.add("b", 0, 1, [])
    qc.add_missing("c", 0, 2)
    assert qc.status == "GOOD"
    assert qc.verdicts["c"].faults[0].fault_type == MISSING


def test_run_of_unfocused_tiles_becomes_persistent_and_stops_at_end():
    qc = MontageQC()
    scopes = [
        qc.add(f"t{i}", 0, i, tile_faults(_stats(), 0.9, [GOOD_MATCH], CFG)).faults[0].scope for i in range(4)
    ]
    assert scopes == ["transient", "transient", "persistent", "persistent"]
    assert qc.status == "STOP_AT_END" and "out_of_focus" in qc.reason


def test_a_good_tile_breaks_the_run():
    qc = MontageQC()
    for i, focus in enumerate([0.9, 0.9, 0.2, 0.9, 0.9]):
        qc.add(f"t{i}", 0, i, tile_faults(_stats(), focus, [GOOD_MATCH], CFG))
    assert all(f.scope == "transient" for v in qc.verdicts.values() for f in v.faults)


def test_critical_fault_stops_now_and_never_relaxes():
    qc = MontageQC()
    qc.add("t0", 0, 0, tile_faults(_stats(saturated=0.9), 0.2, [GOOD_MATCH], CFG))
    assert qc.status == "STOP_NOW"
    qc.add("t1", 0, 1, [])
    assert qc.status == "STOP_NOW"


def test_blank_run_becomes_critical():
    qc = MontageQC()
    for i in range(CFG.critical_blank_run):
        qc.add(f"t{i}", 0, i, tile_faults(_stats(std=0.5), None, [], CFG))
    assert qc.verdicts[f"t{CFG.critical_blank_run - 1}"].faults[0].scope == "critical"
    assert qc.status == "STOP_NOW"


def test_too_many_transient_faults_stop_at_end():
    qc = MontageQC()
    for i in range(CFG.max_transient_faults + 1):
        qc.add(f"t{i}", i, 0, tile_faults(_stats(std=1.0), None, [], CFG))
        qc.add(f"g{i}", i, 1, [])  # good tiles between keep each blank a run of one
    assert qc.status == "STOP_AT_END" and "transient" in qc.reason
