"""The operator's thresholds: read from the session's settings with every bad value named, and each exposure
judged by the first rule it fails (a figure not measured passes)."""

from __future__ import annotations

import pytest

from em_platform.cryo import session as sess
from em_platform.cryo.curation import NAMES, CurationError, Thresholds, judge

GOOD = {
    "total_motion_a": 12.0,
    "early_motion_a": 4.0,
    "defocus_u_a": 15500.0,
    "defocus_v_a": 14500.0,
    "astigmatism_a": 1000.0 - 1,
    "ctf_fit_resolution_a": 4.2,
    "ctf_figure_of_merit": 0.2,
    "ice_ring_density": None,
}


def test_each_rule_rejects_with_its_name_and_the_first_failing_rule_names_the_rejection():
    strict = Thresholds(max_early_motion_a=5.0, min_ctf_figure_of_merit=0.1, max_ice_ring_density=1.0)
    assert judge(GOOD, Thresholds()) == (True, None)
    cases = {
        "total_motion": {"total_motion_a": 31.0},
        "early_motion": {"early_motion_a": 7.0},
        "ctf_fit_resolution": {"ctf_fit_resolution_a": 9.0},
        "defocus_range": {"defocus_u_a": 50000.0, "defocus_v_a": 49000.0},
        "astigmatism": {"astigmatism_a": 1500.0},
        "ctf_figure_of_merit": {"ctf_figure_of_merit": 0.05},
        "ice_ring_density": {"ice_ring_density": 1.5},
    }
    assert judge(GOOD, strict) == (True, None)
    for rule, change in cases.items():
        assert judge(GOOD | change, strict) == (False, rule), rule
    assert judge(GOOD | {"defocus_u_a": 2000.0, "defocus_v_a": 1000.0}, Thresholds()) == (
        False,
        "defocus_range",
    )
    both = GOOD | {"total_motion_a": 40.0, "ctf_fit_resolution_a": 20.0}
    assert judge(both, Thresholds()) == (False, "total_motion")  # the rules' order
    assert judge(both, Thresholds(max_total_motion_a=None)) == (False, "ctf_fit_resolution")  # null: off
    assert judge(GOOD | {"ice_ring_density": None}, strict)[0]  # not measured: passes


def test_thresholds_from_the_session_settings_name_every_bad_value(tmp_path):
    assert Thresholds.from_settings(None) == Thresholds()
    t = Thresholds.from_settings({"max_total_motion_a": 20, "max_defocus_um": None})
    assert t.max_total_motion_a == 20.0 and t.max_defocus_um is None and t.max_astigmatism_a == 1000.0
    with pytest.raises(
        CurationError, match=r"unknown threshold\(s\) \['max_motion'\]; known: max_total_motion_a"
    ):
        Thresholds.from_settings({"max_motion": 3})
    with pytest.raises(CurationError, match="max_total_motion_a must be a number or null"):
        Thresholds.from_settings({"max_total_motion_a": "lots"})
    with pytest.raises(CurationError, match="expected a mapping"):
        Thresholds.from_settings([1, 2])
    (tmp_path / "em_session.yaml").write_text("curation:\n  min_defocus_um: true\n")
    with pytest.raises(
        sess.SessionError, match=r"em_session.yaml: curation: min_defocus_um must be a number"
    ):
        sess.session_settings(tmp_path, tmp_path)
    (tmp_path / "em_session.yaml").write_text("thickness_nm: 150\ncuration:\n  max_ctf_fit_resolution_a: 5\n")
    settings, _ = sess.session_settings(tmp_path, tmp_path)
    assert settings["thickness_nm"] == 150.0 and settings["curation"].max_ctf_fit_resolution_a == 5.0
    assert set(Thresholds().as_dict()) == set(NAMES)
