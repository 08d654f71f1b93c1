"""Batch Dask workers yield the CPU to the live-QC service: their threads at nice 10, their session's
autogroup at nice 19 when the session is theirs (Linux shares the CPU between sessions whatever the
threads' nice values: the deployment starts each service in a session of its own), and the threads that run
tasks at ``SCHED_IDLE``, the event loop not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from em_platform.cluster.batch_priority import (
    BATCH_GROUP_NICENESS,
    BATCH_NICENESS,
    autogroup_niceness,
    parse_autogroup,
    session_is_a_dask_worker,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux scheduling")


def _priorities() -> tuple[int, int | None, bool, int]:
    """In a task: the niceness of the worker thread running it, its session's autogroup's, whether the
    session is a Dask worker's and the thread's scheduling policy."""
    import threading

    from em_platform.cluster.batch_priority import autogroup_niceness, session_is_a_dask_worker

    policy = os.sched_getscheduler(threading.get_native_id())
    return os.getpriority(os.PRIO_PROCESS, 0), autogroup_niceness(), session_is_a_dask_worker(), policy


def _event_loop_policy() -> tuple[str, int]:
    """Run by ``Client.run``: in the worker's event loop thread, whose policy must stay the normal one
    (``SCHED_IDLE`` would starve its heartbeats and its close on a full machine)."""
    import threading

    return threading.current_thread().name, os.sched_getscheduler(threading.get_native_id())


@pytest.fixture
def scheduler():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=0, processes=False, protocol="tcp://", host="127.0.0.1", dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield cluster.scheduler_address, client


def test_a_deployed_batch_worker_lowers_its_threads_and_its_own_session(scheduler):
    """As `make dev` and deploy-local start it: `dask worker --preload ...` in a session of its own."""
    import dask.array as da

    address, client = scheduler
    ours = autogroup_niceness()
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_worker",
            address,
            "--nthreads",
            "1",
            "--no-dashboard",
            "--preload",
            "em_platform.deploy.batch_niceness",
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client.wait_for_workers(1, timeout=60)
        niceness, group, own_session, policy = client.submit(_priorities, pure=False).result(timeout=60)
        assert niceness == BATCH_NICENESS
        assert policy == os.SCHED_IDLE
        ((loop_thread, loop_policy),) = client.run(_event_loop_policy).values()
        assert loop_thread == "MainThread" and loop_policy == os.SCHED_OTHER
        # a task still has its worker: a P2P rechunk (an ingest's) needs it in every task
        ramp = da.arange(400, chunks=40).reshape(20, 20).rechunk((20, 2), method="p2p")
        assert int(ramp.sum().compute()) == 399 * 400 // 2
        assert own_session
        if ours is not None:  # a kernel with autogroups
            assert group == BATCH_GROUP_NICENESS
            assert autogroup_niceness() == ours  # the test's own session (the live service's place) untouched
    finally:
        worker.terminate()
        worker.wait(30)


def test_a_worker_inside_another_session_leaves_that_session_alone():
    """A LocalCluster's worker processes share the session of the process that started them (a run, a
    benchmark): lowering that session's group would slow it all down, and task threads at SCHED_IDLE would
    wait behind it, so only the threads are niced."""
    from distributed import Client, LocalCluster

    ours = autogroup_niceness()
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            preload=["em_platform.deploy.batch_niceness"],
        ) as cluster,
        Client(cluster) as client,
    ):
        niceness, group, own_session, policy = client.submit(_priorities, pure=False).result(timeout=60)
    assert niceness == BATCH_NICENESS
    assert policy == os.SCHED_OTHER
    assert not own_session
    assert group == ours and autogroup_niceness() == ours


def test_a_session_started_by_something_else_is_not_a_workers():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert not session_is_a_dask_worker(child.pid)  # Popen returns after the child's setsid and exec
        assert not session_is_a_dask_worker()  # pytest's own session
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(
    ("text", "niceness"),
    [
        ("/autogroup-93 nice 0\n", 0),
        ("/autogroup-7 nice 19", 19),
        ("/autogroup-7 nice -5", -5),
        ("", None),
        ("garbage", None),
        ("/autogroup-7 nice \n", None),
    ],
)
def test_an_autogroup_line_is_read_or_reported_absent(text, niceness):
    """Some sandboxes (CI's) give an empty /proc/self/autogroup: no autogroup, not a crash."""
    assert parse_autogroup(text) == niceness


def test_the_live_service_says_when_it_does_not_run_at_normal_priority():
    from em_platform.tem.live_service import priority_warning

    if os.getpriority(os.PRIO_PROCESS, 0) == 0 and (autogroup_niceness() or 0) <= 0:
        assert priority_warning() is None  # the test process at normal priority
    niced = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os; os.nice(5); from em_platform.tem.live_service import priority_warning; "
            "print(priority_warning())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "nice 5" in niced.stdout and "normal priority" in niced.stdout
