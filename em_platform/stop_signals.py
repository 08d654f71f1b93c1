"""SIGTERM / SIGINT handlers that take no lock: the stop itself runs in a thread of its own, once.

Python runs a signal handler in the main thread between two bytecodes, wherever that thread is, so a
handler that takes a lock deadlocks when the main thread already holds it: ``Event.set`` while the main
thread waits in ``Event.wait`` (both take the event's condition lock), or a second signal arriving while the
first handler is inside ``Event.set``. The second signal is the common case: a SIGTERM to `make dev`'s job
reaches `em-platform dev` from the shell's ``kill`` and again from ``make``, which passes a fatal signal on
to its children; `make dev` then hung after SIGTERM (its main thread blocked on the lock its own interrupted
handler held), or sent `dagster dev` two SIGINTs ("Aborted!" instead of "Dagster services shut down").
"""

from __future__ import annotations

import itertools
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# what signal.signal installs and returns
Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def on_stop_signal(
    action: Callable[[int], None], signals: Iterable[signal.Signals] = STOP_SIGNALS
) -> dict[int, Handler]:
    """Run ``action(signum)`` in a new thread at the first of ``signals``; every later one is ignored (the
    stop is under way). Install from the main thread; returns the handlers it replaced, for
    :func:`restore`."""
    first = itertools.count()  # next() is one C call: a nested handler cannot slip between test and set

    def handler(signum: int, _frame) -> None:
        if next(first) == 0:
            name = f"on-{signal.Signals(signum).name}"
            threading.Thread(target=action, args=(signum,), name=name, daemon=True).start()

    return {sig: signal.signal(sig, handler) for sig in signals}


def restore(previous: dict[int, Handler]) -> None:
    """Put back the handlers :func:`on_stop_signal` replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)
