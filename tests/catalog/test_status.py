"""The status machine: every legal transition allowed, every other one raises."""

from __future__ import annotations

import itertools

import pytest

from em_platform.catalog.status import ALLOWED, IllegalTransition, Status, check_transition

LEGAL = {
    ("pending", "processing"),
    ("pending", "failed"),
    ("pending", "cancelled"),
    ("processing", "saving-data"),
    ("processing", "failed"),
    ("processing", "cancelled"),
    ("saving-data", "complete"),
    ("saving-data", "failed"),
    ("saving-data", "cancelled"),
    ("complete", "pending"),
    ("failed", "pending"),
    ("failed", "cancelled"),
    ("cancelled", "pending"),
}


def test_table_matches_the_documented_machine():
    assert {(a.value, b.value) for a, targets in ALLOWED.items() for b in targets} == LEGAL


@pytest.mark.parametrize("old,new", sorted(itertools.product([s.value for s in Status], repeat=2)))
def test_each_pair(old, new):
    if (old, new) in LEGAL:
        assert check_transition(old, new) is Status(new)
    else:
        with pytest.raises(IllegalTransition, match=f"from '{old}' to '{new}'"):
            check_transition(old, new)


def test_unknown_status_is_rejected():
    with pytest.raises(ValueError):
        check_transition("pending", "done")
