"""Waiting in a test for something another process or thread does: one poller, with a deadline that fails the
test saying what was awaited and what was last seen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimedOut(TimeoutError, AssertionError):
    """``wait_until``'s deadline passed: a failed assertion to pytest, a TimeoutError to code that handles one
    (the SLURM harness turns it into a failure that shows its daemons' logs)."""


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy, and return that;
    :class:`WaitTimedOut` naming ``what`` and the last value once ``timeout`` seconds have passed.

    ``predicate`` is called once more at the deadline, so a condition met while the poller slept still counts.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimedOut(f"timed out after {timeout:g} s waiting for {what} (last value: {value!r})")
        time.sleep(interval)  # the poll interval, until the deadline above
