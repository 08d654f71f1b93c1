"""Batch work behind live work on a shared machine: the CPU priority a batch Dask worker gives itself.

Linux schedules by *autogroup* when ``kernel.sched_autogroup_enabled`` is 1 (the default of most
distributions, and of this machine): every session (``setsid``) is a group, groups share the CPU equally,
and a thread's nice value (or ``SCHED_IDLE``) orders it only against threads of its own session
(sched(7), "The autogroup feature"). `make dev` and deploy-local start each service in a session of its own
(``start_new_session``), so the batch workers' nice 10 gave the live-QC service nothing while an ingest and
a fusion ran: measured here with two busy processes on one core, one of them at nice 10, in two sessions
each took half, in one session 91 % against 9 %; ``SCHED_IDLE`` across sessions, half again. The session's
group has a nice value of its own (``/proc/self/autogroup``): at 10 the same pair split 90 % / 10 % of what
they got, at 19 97 % / 3 % (the rest of the core went to other sessions on the machine).

So a batch worker lowers both: its threads' nice (against the live-QC service when everything runs in one
session, or when autogroup is off) and its session's group (against every other session), the latter only
when the session is the worker's own: its leader is a Dask worker command (the ``dask worker`` that a
supervisor started with ``start_new_session``). A worker spawned inside a process that does other things
(a ``LocalCluster`` in a run, a benchmark) leaves the group alone: that would slow the whole session down.
Containers (compose) are cgroups, where neither applies: there CPU weights are the compose file's to set.

The threads that run the batch tasks go further: ``SCHED_IDLE`` (:func:`idle_thread`). Not for the order
between sessions (an autogroup's share is its nice value's, whatever its threads' policy) but for *where* a
live thread wakes: Linux counts a core running only ``SCHED_IDLE`` threads as idle when it places a waking
thread (``sched_idle_cpu``), so a live thread lands on the core the batch holds and takes it at once, instead
of queueing behind its own service's other thread while the batch keeps the other core (bench_tiles_live
--with-batch: fewer live threads runnable but waiting, the pool's share unchanged). Only the task threads: the
worker's event loop keeps the normal policy (at nice 10), so its heartbeats and its close are not starved on a
full machine (``SCHED_IDLE`` for the whole worker starved them).

The batch work is slower only while live tiles want the cores; idle cores are still all the batch's.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

BATCH_NICENESS = 10  # each batch thread, against the live-QC service's threads in the same session
BATCH_GROUP_NICENESS = 19  # the batch worker's session, against every other session (the live-QC service's)
_DASK_WORKER_COMMANDS = ("distributed.cli.dask_worker", "dask-worker", "dask_worker")


def lower_priority(
    niceness: int = BATCH_NICENESS, group_niceness: int = BATCH_GROUP_NICENESS
) -> dict[str, int | None]:
    """Lower this thread's CPU priority to ``niceness`` (threads it starts later inherit it: call it before
    the worker's executor threads exist) and, when the session is this batch worker's own, the session's
    autogroup to ``group_niceness``. Returns what holds afterwards: ``{"niceness", "group_niceness"}``
    (None: no autogroup here, or not the worker's to change). Never raises: a worker that cannot lower its
    priority still works."""
    return {"niceness": lower_thread_priority(niceness), "group_niceness": _lower_group(group_niceness)}


def lower_thread_priority(niceness: int) -> int:
    """Raise this thread's nice value to at least ``niceness`` (Linux keeps it per thread, and threads
    started afterwards inherit it; elsewhere it is the process's). Returns the value that holds; never
    raises (a thread that cannot lower its priority still works)."""
    who = threading.get_native_id() if sys.platform == "linux" else 0
    current = os.getpriority(os.PRIO_PROCESS, who)
    if current < niceness:
        try:
            os.setpriority(os.PRIO_PROCESS, who, niceness)
        except OSError as exc:
            log.warning("could not lower a thread's CPU priority to nice %d: %s", niceness, exc)
    return os.getpriority(os.PRIO_PROCESS, who)


def idle_thread() -> bool:
    """Put this thread at ``SCHED_IDLE`` (Linux; a thread may always lower its own policy). Whether it
    holds; never raises (elsewhere, or refused, the thread keeps its policy and still works)."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    who = threading.get_native_id()
    try:
        os.sched_setscheduler(who, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:
        log.warning("could not put a batch thread at SCHED_IDLE: %s", exc)
    return os.sched_getscheduler(who) == os.SCHED_IDLE


def autogroup_niceness(pid: int | str = "self") -> int | None:
    """The nice value of a process's autogroup; None where the kernel has no autogroups (no file, or one
    that says nothing, as in some container sandboxes)."""
    try:
        text = Path(f"/proc/{pid}/autogroup").read_text()
    except OSError:
        return None
    return parse_autogroup(text)


def parse_autogroup(text: str) -> int | None:
    """The nice value in a ``/proc/<pid>/autogroup`` line ("/autogroup-93 nice 0"); None if it has none."""
    found = re.search(r"\bnice\s+(-?\d+)", text)
    return int(found.group(1)) if found else None


def session_is_a_dask_worker(pid: int | None = None) -> bool:
    """Whether the session of ``pid`` (this process) was started by a Dask worker command, so that
    everything in it is batch work."""
    try:
        leader = os.getsid(pid or 0)
        argv = Path(f"/proc/{leader}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    words = [Path(a.decode(errors="replace")).name for a in argv if a]
    if any(w in _DASK_WORKER_COMMANDS for w in words):
        return True
    return any(a == "dask" and b == "worker" for a, b in zip(words, words[1:], strict=False))


def lower_own_session(group_niceness: int) -> int | None:
    """Lower the autogroup of the session this process leads (a service started in a session of its own)
    to ``group_niceness``; None where there is no autogroup or the session is not this process's."""
    if os.getsid(0) != os.getpid():
        return None
    return _set_group(group_niceness)


def _lower_group(group_niceness: int) -> int | None:
    if not session_is_a_dask_worker():
        return None
    return _set_group(group_niceness)


def _set_group(group_niceness: int) -> int | None:
    now = autogroup_niceness()
    if now is None:
        return None
    if now < group_niceness:
        try:
            Path("/proc/self/autogroup").write_text(str(group_niceness))
        except OSError as exc:
            log.warning("batch worker: could not lower its session's CPU share (autogroup): %s", exc)
    return autogroup_niceness()
