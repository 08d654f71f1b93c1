"""The tests' one poller (tests/support/polling.py): it returns what the condition returned, and at its deadline
it fails saying what it waited for and what it last saw."""

from __future__ import annotations

import itertools

import pytest

from tests.support.polling import WaitTimedOut, wait_until
from tests.support.ports import free_port, free_ports


def test_it_returns_the_first_truthy_value():
    calls = itertools.count()
    assert wait_until(lambda: next(calls) >= 2 and "ready", 10, "the third call", interval=0.001) == "ready"


def test_at_its_deadline_it_fails_naming_what_it_waited_for_and_the_last_value():
    with pytest.raises(
        AssertionError, match=r"waiting for the journal's tile \(last value: \[\]\)"
    ) as failed:
        wait_until(lambda: [], 0.05, "the journal's tile", interval=0.01)
    assert isinstance(failed.value, WaitTimedOut) and isinstance(failed.value, TimeoutError)
    assert "timed out after 0.05 s" in str(failed.value)


def test_free_ports_are_distinct_loopback_ports():
    ports = free_ports(3)
    assert len(set(ports)) == 3 and all(0 < p < 65536 for p in ports)
    assert 0 < free_port() < 65536
