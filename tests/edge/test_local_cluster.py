"""The embedded Dask cluster (no scheduler configured) listens on loopback only: Dask runs the pickled code
that reaches its ports, and its defaults serve HTTP on every interface (issue 22, "Open ports run code")."""

from __future__ import annotations

import os

import psutil

from em_platform.resources.dask import DaskResource


def _listening(pid: int) -> set[str]:
    me = psutil.Process(pid)
    return {
        c.laddr.ip
        for p in (me, *me.children(recursive=True))
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


def test_embedded_cluster_binds_loopback_only():
    before = _listening(os.getpid())
    dask = DaskResource(n_workers=1, threads_per_worker=1)
    try:
        assert dask.get_client().submit(sum, [1, 2]).result() == 3
        opened = _listening(os.getpid()) - before
    finally:
        dask.teardown_after_execution(None)
    assert opened, "the cluster opened no listening socket: nothing was checked"
    assert opened <= {"127.0.0.1", "::1"}, f"the embedded Dask cluster listens on {sorted(opened)}"


def test_shutdown_hides_only_the_heartbeat_that_meets_the_closing_scheduler(caplog):
    """A heartbeat in flight when the embedded cluster closes logs a CommClosedError traceback (seen in `make
    demo`'s output); that one is our own shutdown. Any other worker error still reaches the log."""
    import logging

    from em_platform.resources.dask import _quiet_heartbeats

    worker_log = logging.getLogger("distributed.worker")
    with caplog.at_level(logging.ERROR, logger="distributed.worker"):
        with _quiet_heartbeats():
            worker_log.error("Failed to communicate with scheduler during heartbeat.")
            worker_log.error("Compute Failed")
        worker_log.error("Failed to communicate with scheduler during heartbeat.")
    assert [r.getMessage() for r in caplog.records] == [
        "Compute Failed",
        "Failed to communicate with scheduler during heartbeat.",
    ]
