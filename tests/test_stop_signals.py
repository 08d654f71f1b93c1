"""A stop signal's handler takes no lock: the stop runs once, in a thread of its own, even when the main
thread holds the lock the stop needs and a second signal arrives mid-stop (`make dev` gets SIGTERM from the
shell's kill and again from make)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# The main thread holds the event's condition lock (as inside Event.wait) when both signals arrive; the old
# handler, `lambda *_: stop.set()`, then waits for that lock in the main thread, forever.
SCRIPT = textwrap.dedent(
    """
    import os, signal, threading
    from em_platform.stop_signals import on_stop_signal, restore

    stop = threading.Event()
    calls = []

    def action(signum):
        calls.append((signum, threading.current_thread() is threading.main_thread()))
        stop.set()

    previous = {handler}
    with stop._cond:  # what Event.wait holds while it checks the flag
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # bytecodes: the handlers run in between
            pass
    assert stop.wait(10), "the stop never ran"
    print(calls)
    """
)


def _run(handler: str) -> subprocess.CompletedProcess:
    code = SCRIPT.replace("{handler}", handler)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_the_stop_runs_once_off_the_main_thread_while_it_holds_the_lock():
    done = _run("on_stop_signal(action)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[(15, False)]"  # SIGTERM first, once, not in the main thread


def test_a_handler_that_takes_the_lock_deadlocks_there():
    """The case above with the handler the live-QC service had: the reason for the module."""
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run(
            [
                sys.executable,
                "-c",
                SCRIPT.replace("{handler}", "signal.signal(signal.SIGTERM, lambda *_: stop.set())"),
            ],
            capture_output=True,
            text=True,
            timeout=5,
        )
