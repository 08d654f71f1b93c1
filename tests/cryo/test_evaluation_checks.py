"""The FSC check compares the aligned and the nominal-geometry tomograms, also when both reach the grid's limit."""

from __future__ import annotations

import pytest

from em_platform.cryo.evaluation import fsc_check


def _fig(a143, u143, a05, u05):
    return {
        "fsc_0.143_aligned_A": a143,
        "fsc_0.143_unaligned_A": u143,
        "fsc_0.5_aligned_A": a05,
        "fsc_0.5_unaligned_A": u05,
    }


@pytest.mark.parametrize(
    ("fig", "passed", "applicable"),
    [
        (_fig(75.5, 75.9, 79.0, 81.8), True, True),  # finer at 0.143
        (_fig(76.0, 75.5, 79.0, 81.8), False, True),  # coarser at 0.143: 0.5 does not rescue it
        (_fig(32.0, 32.0, 40.0, 45.0), True, True),  # both at Nyquist at 0.143: finer at 0.5
        (_fig(32.0, 32.0, 45.0, 40.0), False, True),  # both at Nyquist at 0.143: coarser at 0.5
        (_fig(32.0, 32.0, 32.0, 32.0), True, False),  # indistinguishable: said so, not failed
        (_fig(None, 32.0, None, 32.0), False, True),  # no aligned figure
    ],
)
def test_fsc_check(fig, passed, applicable):
    result = fsc_check(fig)
    assert result.passed is passed
    assert ("not_applicable" in result.metadata) is (not applicable)
