"""The embedded Dask cluster (no scheduler configured) listens on loopback only: Dask runs the pickled code
that reaches its ports, and its defaults serve HTTP on every interface (issue 22, "Open ports run code")."""

from __future__ import annotations

import os

import psutil

from em_platform.resources.dask import DaskResource
from tests.support.dask_settings import worker_settings


def _listening(pid: int) -> dict[int, set[str]]:
    """Listening port -> the addresses it is bound on, for this process and its children."""
    me = psutil.Process(pid)
    out: dict[int, set[str]] = {}
    for p in (me, *me.children(recursive=True)):
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                out.setdefault(c.laddr.port, set()).add(c.laddr.ip)
    return out


def test_embedded_cluster_binds_loopback_only():
    """Every port the cluster opened (those not open before; other tests' servers in this process may come
    and go meanwhile, so only ports the cluster itself reports count, and must have been opened)."""
    before = _listening(os.getpid())
    dask = DaskResource(n_workers=1, threads_per_worker=1)
    try:
        client = dask.get_client()
        assert client.submit(sum, [1, 2]).result() == 3
        info = client.scheduler_info()
        addresses = [info["address"], *info["workers"]]  # inproc:// in threads mode, tcp:// with processes
        ports = {int(a.rsplit(":", 1)[1]) for a in addresses if a.startswith("tcp://")}
        ports |= {int(p) for p in info["services"].values()}
        ports |= {int(p) for w in info["workers"].values() for p in (w.get("services") or {}).values()}
        opened = {port: ips for port, ips in _listening(os.getpid()).items() if port not in before}
    finally:
        dask.teardown_after_execution(None)
    mine = {port: ips for port, ips in opened.items() if port in ports}
    assert mine, f"none of the cluster's ports {sorted(ports)} found listening: nothing was checked"
    bound = set().union(*mine.values())
    assert bound <= {"127.0.0.1", "::1"}, f"the embedded Dask cluster listens on {sorted(bound)}"


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


def test_embedded_cluster_starts_with_theworker_settings():
    """The embedded cluster's workers run no profiler and tick once a second (em_platform.quiet_dask), and the
    settings stay around the cluster's start only: Dask's defaults are back afterwards."""
    import dask

    dask_resource = DaskResource(n_workers=1, threads_per_worker=1)
    try:
        client = dask_resource.get_client()
        settings = client.run(worker_settings)
        assert set(settings.values()) == {(False, 1.0, 0.5)}, settings
        assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler._tick_interval) == 1.0
    finally:
        dask_resource.teardown_after_execution(None)
    assert dask.config.get("distributed.worker.profile.enabled") is True


def test_quiet_environment_spells_the_quiet_config():
    """The environment given to `make dev`'s and the deployment's Dask processes is the same configuration."""
    import dask

    from em_platform.quiet_dask import QUIET_DASK_CONFIG, QUIET_DASK_ENV

    collected = dask.config.collect_env(QUIET_DASK_ENV)
    for key, value in QUIET_DASK_CONFIG.items():
        assert dask.config.get(key, config=collected) == value, key
    assert len(QUIET_DASK_ENV) == len(QUIET_DASK_CONFIG)


def test_a_dask_setting_from_the_environment_wins(monkeypatch):
    """A user who sets a Dask variable gets it: the quiet settings fill in only what the environment leaves."""
    import dask

    monkeypatch.setenv("DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL", "250ms")
    dask.config.refresh()
    try:
        dask_resource = DaskResource(n_workers=1, threads_per_worker=1)
        try:
            settings = dask_resource.get_client().run(worker_settings)
            assert set(settings.values()) == {(False, 0.25, 0.5)}, settings
        finally:
            dask_resource.teardown_after_execution(None)
    finally:
        monkeypatch.delenv("DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL")
        dask.config.refresh()
