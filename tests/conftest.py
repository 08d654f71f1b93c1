"""Shared fixtures: real PostgreSQL (skips with a reason when absent) and a real S3 endpoint on loopback."""

from __future__ import annotations

import os
import signal
import uuid

import pytest

from tests.support.ports import free_port

PG_HOST = os.environ.get("EM_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("EM_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("EM_TEST_PG_USER", "postgres")


@pytest.fixture(autouse=True)
def _sigterm_left_as_found():
    """Dagster's in-process execution (``materialize``, ``execute_in_process``) left SIGTERM ignored in the pytest
    worker (every test that ran it, named by a first version of this fixture), and every process a later test of that pytest worker starts inherits it through fork and exec:
    its stop is then ignored (a fresh clone's make test waited out the viewer's and the web guard's 30 s
    teardowns, and make dev's test saw a run it had stopped alive). Each test starts with SIGTERM as the
    worker started: default, not blocked."""
    yield
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])


@pytest.fixture(autouse=True)
def _no_dead_dagster_instance_in_context():
    """Forget a Dagster defs-state storage whose instance is gone.

    Every DagsterInstance puts its defs-state storage in a process-wide context variable and takes it out
    only when the instance is closed; an instance that is garbage-collected unclosed (inside Dagster or a
    library) leaves it behind, and every later Definitions resolution then fails with "Attempted to resolve
    undefined DagsterInstance weakref". Test order must not decide that.
    """
    from dagster._core.storage.defs_state.base import _current_storage

    storage = _current_storage.get()
    ref = getattr(storage, "_instance_weakref", None)
    if storage is not None and ref is not None and ref() is None:
        _current_storage.set(None)
    yield


@pytest.fixture
def pg_url():
    """A fresh, empty PostgreSQL database on the local server, dropped afterwards."""
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=3
        )
    except Exception as exc:
        pytest.skip(
            f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT} as {PG_USER} ({exc}); catalog-on-PostgreSQL test skipped"
        )
    admin.autocommit = True
    name = f"em_test_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cur.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto in server mode) on a loopback port, for the whole session."""
    server_mod = pytest.importorskip("moto.server")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A new bucket on the loopback S3 endpoint; returns (s3://bucket, storage_options)."""
    import s3fs

    opts = {"client_kwargs": {"endpoint_url": s3_endpoint}, "key": "testing", "secret": "testing"}
    fs = s3fs.S3FileSystem(**opts)
    bucket = f"em-test-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    return f"s3://{bucket}", opts


# Modules that share the one `make demo` checkout of tests/support/demo_state.py (and change its state in order).
DEMO_MODULES = ("tests/browser/", "tests/test_demo.py", "tests/test_doc_commands.py")
# Modules that share tests/deploy's one process topology (its fixtures are package-scoped); the package's
# other modules (compose file, runner) need none and go on their own.
TOPOLOGY_MODULES = (
    "tests/deploy/test_topology.py",
    "tests/deploy/test_faults.py",
    "tests/deploy/test_web_ui.py",
)
# The longest work units, started first so that neither core is left with one at the end (make test's from its
# --durations on 2026-11-27, a minute or more each; the end-to-end units lead make test-e2e).
LONGEST_FIRST = (
    "demo",
    "topology",
    "tests/stitch/test_hard_montages.py",
    "tests/cryo/test_demo_series.py",
    "tests/slurm/test_platform_on_slurm.py",
    "tests/orchestration/test_crash_recovery.py",
    "tests/stitch/test_scale_disagreement.py",
    "tests/test_dev_command.py",
)
END_TO_END = ("demo", "topology")


def _work_unit(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    if path.startswith(DEMO_MODULES):
        return "demo"
    if path.startswith(TOPOLOGY_MODULES):
        return "topology"
    return path


def pytest_xdist_make_scheduler(config, log):
    """`make test` runs on two cores (pytest-xdist). A work unit is a module, so its module-scoped fixtures
    (a stitched montage) are built once, on one worker; the modules sharing tests/deploy's topology and those
    of the demo checkout are one unit each. Units go out in collection order (see below), not xdist's by size."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(nodeid)

    config.option.loadscopereorder = False
    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """The longest units first; the order within each unit is kept (the demo's modules depend on it). The demo
    and topology units are marked ``end_to_end`` (make test-e2e's), the other longest ones ``slow``."""

    def rank(item) -> int:
        unit = _work_unit(item.nodeid)
        return next((i for i, u in enumerate(LONGEST_FIRST) if unit == u), len(LONGEST_FIRST))

    items.sort(key=rank)
    for item in items:  # make test leaves the two end-to-end units to make test-e2e
        unit = _work_unit(item.nodeid)
        if unit in END_TO_END:
            item.add_marker(pytest.mark.end_to_end)
        elif unit in LONGEST_FIRST:  # make test-fast leaves out the longest units too
            item.add_marker(pytest.mark.slow)


def pytest_sessionfinish(session, exitstatus):
    """The `make demo` checkout removed by the process that made it (xdist: one worker)."""
    from tests.support.demo_state import remove_demo_state

    remove_demo_state()
