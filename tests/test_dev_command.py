"""`em-platform dev` keeps the daemon's log to what happened, at INFO: sensor ticks that found nothing and runs'
DEBUG events are left out."""

from em_platform.dev import quiet_lines


def test_quiet_lines_drop_empty_sensor_ticks_only():
    lines = [
        "2026-01-01 - dagster.daemon.SensorDaemon - INFO - Checking for new runs for sensor: montage_sensor\n",
        "2026-01-01 - dagster.daemon.SensorDaemon - INFO - Sensor montage_sensor skipped: no new montage after 3\n",
        "2026-01-01 - dagster.daemon.SensorDaemon - INFO - No run requests returned for inbox_sensor, skipping\n",
        "2026-01-01 - dagster.daemon.SensorDaemon - INFO - Launching run for inbox_sensor\n",
        "2026-01-01 - dagster-webserver - INFO - Serving dagster-webserver on http://127.0.0.1:3000\n",
        "2026-01-01 12:00:00 +0000 - dagster - DEBUG - demo_job - 1f2e - ingest - STEP_START - Started\n",
        "2026-01-01 12:00:01 +0000 - dagster - ERROR - demo_job - 1f2e - ingest - STEP_FAILURE - Failed\n",
    ]
    assert list(quiet_lines(lines)) == lines[3:5] + lines[6:]


def test_quiet_lines_drop_asset_daemon_ticks_that_start_no_run():
    def tick(evaluation: int, runs: int) -> list[str]:
        daemon = "2026-01-01 - dagster.daemon.AssetDaemon - INFO - "
        return [
            f"{daemon}Checking 1 assets/checks and 0 observable source assets for catalog_automation\n",
            f"{daemon}Tick produced {runs} runs and 1 asset evaluation for evaluation ID {evaluation}\n",
            f"{daemon}Submitting {runs} runs for evaluation {evaluation} for catalog_automation in em_platform\n",
            f"{daemon}Finished auto-materialization tick for catalog_automation in em_platform\n",
        ]

    webserver = "2026-01-01 - dagster-webserver - INFO - Serving dagster-webserver on http://127.0.0.1:3000\n"
    lines = tick(3, 0) + [webserver] + tick(4, 1) + tick(5, 0)[:2]
    assert list(quiet_lines(lines)) == [webserver] + tick(4, 1) + tick(5, 0)[:2]  # the last one cut short


def test_a_dagster_that_ignores_sigint_is_killed_after_the_grace(monkeypatch):
    """A daemon busy launching a run can hold `dagster dev` past SIGINT; the wrapper must still stop it."""
    import io
    import signal
    import subprocess
    import sys

    from em_platform import dev

    monkeypatch.setattr(dev, "SHUTDOWN_GRACE_SECONDS", 0.5)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('ready', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert child.stdout.readline().strip() == "ready"  # SIGINT is ignored from here on
    out = io.StringIO()
    dev._shut_down(child, out)
    assert child.wait(10) == -signal.SIGKILL
    assert "killing its processes" in out.getvalue()


def test_a_workers_stop_lines_are_dropped_only_once_the_stop_has_begun():
    """A batch worker starved at autogroup nice 19 may outlive its nanny's 8 s on SIGTERM, and a worker closing
    may have a heartbeat in flight when the scheduler drops it: at our stop the nanny's kill warning and the
    failed heartbeat (with its traceback) are the stop finishing. The same lines before the stop are a real
    fault and show."""
    import io
    import sys
    import time

    from em_platform import dev

    kill = "distributed.nanny - WARNING - Worker process still alive after 8.0 seconds, killing"
    heartbeat = [
        "2026-11-29 05:53:24,179 - distributed.worker - ERROR - Failed to communicate with scheduler during heartbeat.",
        "Traceback (most recent call last):",
        '  File "distributed/comm/tcp.py", line 226, in read',
        "tornado.iostream.StreamClosedError: Stream is closed",
        "",
        "The above exception was the direct cause of the following exception:",
        "",
        "distributed.comm.core.CommClosedError: in <TLS (closed) ConnectionPool.heartbeat_worker>: Stream is closed",
    ]
    lines = [kill, *heartbeat]
    script = (
        "import signal, sys, time\n"
        f"lines = {lines!r}\n"
        "def stop(*_): print(*lines, sep='\\n', flush=True); print('closed', flush=True); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print(*lines, sep='\\n', flush=True)\n"
        "while True: time.sleep(1)\n"
    )
    out = io.StringIO()
    service = dev.Supervised(
        "worker", [sys.executable, "-c", script], out, quiet_at_stop=dev.WORKER_STOP_NOISE
    )
    deadline = time.monotonic() + 30
    while heartbeat[-1] not in out.getvalue():  # the child has started and installed its SIGTERM handler
        assert time.monotonic() < deadline, out.getvalue()
        time.sleep(0.05)
    service.stop()
    assert out.getvalue().splitlines() == [*lines, "closed"]


def test_a_quiet_records_traceback_is_left_out_with_it_and_a_warnings_shown():
    """At Ctrl-C the pool's scheduler logs a worker's closed connection as an INFO record with a traceback
    (distributed.batched's "Batched Comm Closed"): the record is routine, its traceback too. A warning's
    traceback shows, and so does a plain line after a quiet record."""
    import io
    import sys
    import time

    from em_platform import dev

    info = [
        "2026-11-27 00:58:59,123 - distributed.batched - INFO - Batched Comm Closed <TCP (closed)>",
        "Traceback (most recent call last):",
        '  File "distributed/comm/tcp.py", line 298, in write',
        "    raise StreamClosedError()",
        "tornado.iostream.StreamClosedError: Stream is closed",
        "",
        "The above exception was the direct cause of the following exception:",
        "",
        "distributed.comm.core.CommClosedError: in <TCP (closed) Scheduler connection to worker>: Stream is closed",
    ]
    warning = [
        "2026-11-27 00:59:00,001 - distributed.scheduler - WARNING - Worker failed to heartbeat",
        "Traceback (most recent call last):",
        "OSError: [Errno 99] Cannot assign requested address",
    ]
    lines = [*info, *warning, *info, "the end"]
    script = f"import sys\nsys.stdout.write({chr(10).join(lines) + chr(10)!r})\nsys.stdout.flush()\n"
    out = io.StringIO()
    service = dev.Supervised("scheduler", [sys.executable, "-c", script], out, dev.DASK_INFO)
    deadline = time.monotonic() + 30
    while "the end" not in out.getvalue():
        assert time.monotonic() < deadline, out.getvalue()
        time.sleep(0.05)
    service.stop()
    assert out.getvalue().splitlines()[: len(warning) + 1] == [*warning, "the end"]


def test_the_dev_dask_pool_is_shared_warm_niced_and_restarted_when_a_worker_dies(tmp_path):
    """`make dev`'s one Dask pool, TLS only: every run's client reaches it; a worker process per core, each doing its
    batch work at nice 10 (the live-QC service's threads first) with the quiet settings; a worker killed with
    SIGKILL is restarted by the supervisor; stopping the pool stops every process it started."""
    import io
    import os
    import signal
    import time

    import psutil
    import pytest
    from distributed import Client

    from em_platform.dev import DaskPool
    from tests.support.dask_settings import worker_settings

    out = io.StringIO()
    pool = DaskPool.start(out, certs=tmp_path / "dask-certs")
    try:
        assert pool.address.startswith("tls://127.0.0.1:")
        with pytest.raises((OSError, TimeoutError)):  # loopback, but no client without its certificate
            Client(pool.address.replace("tls://", "tcp://"), timeout="5s")
        with Client(pool.address, timeout="60s", security=pool.security()) as client:
            client.wait_for_workers(os.cpu_count() or 1, timeout=120)
            assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
            niceness = client.run(lambda: os.getpriority(os.PRIO_PROCESS, 0))
            assert sorted(niceness.values()) == [10] * (os.cpu_count() or 1)
            quiet = client.run(worker_settings)  # em_platform.quiet_dask's, from the environment
            assert set(quiet.values()) == {(False, 1.0, 0.5)}, quiet
            assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler._tick_interval) == 1.0
            first = pool.workers.proc.pid
            os.kill(first, signal.SIGKILL)  # the `dask worker` process and so its nannies
            deadline = time.monotonic() + 120
            while pool.workers.proc is None or pool.workers.proc.pid == first:
                assert time.monotonic() < deadline, out.getvalue()[-3000:]
                time.sleep(0.2)  # poll interval while the supervisor restarts it
            client.wait_for_workers(os.cpu_count() or 1, timeout=120)
            assert client.submit(sum, [4, 5]).result(timeout=60) == 9
        assert "dask-worker exited" in out.getvalue()
        assert " - INFO - " not in out.getvalue()
        started = [pool.scheduler.proc.pid, pool.workers.proc.pid]
        children = psutil.Process(pool.workers.proc.pid).children(recursive=True)
    finally:
        pool.stop()
    gone, alive = psutil.wait_procs(
        [psutil.Process(p) for p in started if psutil.pid_exists(p)] + children, 30
    )
    assert not alive, alive


def test_a_run_left_running_by_dagster_does_not_hold_make_dev_after_it_stops(monkeypatch):
    """A run its code server started outlives `dagster dev` and holds its log pipe: `make dev` must not wait
    for the run to end (it did: a docs test saw 30 s), it stops it."""
    import io
    import subprocess
    import sys
    import time

    from em_platform import dev

    monkeypatch.setattr(dev, "SHUTDOWN_GRACE_SECONDS", 5.0)
    run_id = "1f2e3d4c-0000-4111-8222-333344445555"
    run = (  # its command line as `dagster api execute_run` has it: the run's id in its serialized arguments
        f'# dagster api execute_run {{"run_id": "{run_id}"}}\n'
        "import sys, time; print('run started', flush=True); print('up', file=sys.stderr, flush=True); "
        "time.sleep(120)"
    )
    dagster = (  # starts a "run" (in its process group, as its code server does), exits when it is up
        "import subprocess, sys; "
        f"r = subprocess.Popen([sys.executable, '-c', {run!r}], stderr=subprocess.PIPE, text=True); "
        "r.stderr.readline(); print(sys.stdin.readline().strip(), flush=True)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", dagster],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    child.stdin.write("Dagster services shut down.\n")
    child.stdin.close()
    out = io.StringIO()
    began = time.monotonic()
    assert dev._serve(child, out) == 0
    assert time.monotonic() - began < 10, out.getvalue()  # the grace, not the run's 120 s
    assert "Dagster services shut down." in out.getvalue() and "run started" in out.getvalue()
    assert f"stopping the run(s) Dagster left running: {run_id}" in out.getvalue()
    assert not dev._group_alive(child.pid)


def test_make_dev_serves_its_ui_behind_the_guard_and_ctrl_c_stops_it_leaving_nothing(tmp_path):
    """`make dev` up: its UI refuses the cross-site requests a web page could make (and answers its own). Then
    a terminal's Ctrl-C is SIGINT to its foreground process group: `em-platform dev`'s. Everything stops in
    order: no service is restarted once the stop has begun, no traceback, no leaked semaphore, no runs line
    when no run was running, and no process of it is left."""
    import os
    import re
    import shutil
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    import psutil

    from tests.support.browser import REPO
    from tests.support.environment import clean_env
    from tests.support.ports import free_port

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO / "dagster.yaml", home / "dagster.yaml")
    port = free_port()
    env = clean_env("EM_", "DAGSTER_", "DASK_")
    env.update(
        DAGSTER_HOME=str(home),
        EM_DATA_ROOT=str(tmp_path / "data"),
        EM_VIEWER_URL=f"http://127.0.0.1:{free_port()}",
        EM_LIVE_QC_METRICS=f"127.0.0.1:{free_port()}",
        EM_CRYO_LIVE_METRICS=f"127.0.0.1:{free_port()}",
        EM_METRICS=f"127.0.0.1:{free_port()}",
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "dev.log"
    with open(log, "w") as out:
        dev = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "em_platform.cli",
                "dev",
                "--workspace",
                "workspace.yaml",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own group, as a shell gives a foreground job
        )
    try:
        deadline = time.monotonic() + 180
        ready = (
            "live-qc: watching",
            "cryo-live: processing each",
            "Serving dagster-webserver",
            "viewer",
            "metrics: the facility's gauges",
        )
        while not all(marker in log.read_text() for marker in ready):
            assert dev.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)  # poll the log the processes write
        while True:  # dagster prints "Serving dagster-webserver" before uvicorn listens
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=30).read()
                break
            except OSError:  # refused until it listens (urllib wraps it in URLError, an OSError)
                assert dev.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        _its_ui_is_behind_the_guard(f"http://127.0.0.1:{port}")
        for metrics in (env["EM_LIVE_QC_METRICS"], env["EM_CRYO_LIVE_METRICS"], env["EM_METRICS"]):
            assert f"http://{metrics}/metrics" in log.read_text()
            assert b"process_cpu_seconds_total" in urllib.request.urlopen(f"http://{metrics}/metrics").read()
        started = psutil.Process(dev.pid).children(recursive=True)
        # dagster dev and its services, live-qc, cryo-live, viewer, metrics, Dask
        assert len(started) >= 7, started
        before = len(log.read_text())
        os.killpg(dev.pid, signal.SIGINT)  # Ctrl-C
        assert dev.wait(90) == 0 or dev.returncode in (-signal.SIGINT, 130), log.read_text()[-3000:]
    finally:
        if dev.poll() is None:  # failed before the stop: leave none of it running
            tree = psutil.Process(dev.pid).children(recursive=True)
            os.killpg(dev.pid, signal.SIGKILL)
            _kill(tree)  # `dagster dev` and the services have sessions of their own
    stop_lines = log.read_text()[before:]
    print(stop_lines)
    warned = [line for line in log.read_text().splitlines() if "warning" in line.lower()]
    assert not warned, warned  # a fresh Dagster home, a fresh start: nothing a user cannot act on
    assert "em-platform dev: SIGINT: stopping" in stop_lines and "em-platform dev: stopped" in stop_lines
    noise = re.compile(
        r"restarting|Traceback|Error|leaked|semaphore|Exception|stopping the run", re.IGNORECASE
    )
    assert not [line for line in stop_lines.splitlines() if noise.search(line)], stop_lines
    gone, alive = psutil.wait_procs(started, 30)
    left = [(p.pid, p.cmdline()) for p in alive]
    _kill(alive)
    assert not left, left


def _its_ui_is_behind_the_guard(ui: str) -> None:
    """Issue 50: `make dev`'s UI on 127.0.0.1 ran a mutation sent by any page the operator's browser opened.
    Crafted as such pages send them, each is refused; the UI's own kind of request is answered."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    mutation = 'mutation { terminateRun(runId: "none") { __typename } }'
    body = json.dumps({"query": mutation}).encode()

    def status(url: str, data: bytes | None = None, **headers: str) -> int:
        req = urllib.request.Request(
            url, data=data, headers={k.replace("_", "-"): v for k, v in headers.items()}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                assert resp.headers["X-Frame-Options"] == "DENY"
                return resp.status
        except urllib.error.HTTPError as exc:
            assert exc.headers["X-Frame-Options"] == "DENY"
            return exc.code

    graphql = ui + "/graphql"
    assert status(graphql, body, Content_Type="text/plain; charset=application/json") == 415
    assert status(graphql + "?" + urllib.parse.urlencode({"query": mutation})) == 405
    assert status(graphql, body, Content_Type="application/json", Origin="https://evil.example") == 403
    assert status(graphql, body, Content_Type="application/json", Host="evil.example:3000") == 421
    assert status(graphql, body, Content_Type="application/json", Origin=ui) == 200


def _kill(processes) -> None:
    import psutil

    for p in processes:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_the_code_location_lost_to_the_stop_is_no_error_but_any_other_is():
    import threading

    from em_platform.dev import without_shutdown_race

    def block(error: str) -> list[str]:
        return [
            "2026-01-01 - dagster.daemon.SensorDaemon - \x1b[34mERROR\x1b[0m - Sensor daemon caught an error\n",
            "Traceback (most recent call last):\n",
            '  File "dagster/_daemon/sensor.py", line 649, in _process_tick_generator\n',
            "    yield from _evaluate_sensor(\n",
            f"{error}\n",
        ]

    gone = block(
        "dagster._core.errors.DagsterCodeLocationNotFoundError: Location em_platform does not exist in workspace"
    )
    other = block("sqlalchemy.exc.OperationalError: database is locked")
    single = ["2026-01-01 - dagster.daemon.SensorDaemon - ERROR - a one-line error\n"]
    info = ["2026-01-01 - dagster - INFO - Shutting down Dagster services...\n"]
    stopping = threading.Event()
    lines = gone + info + other + single + info
    assert list(without_shutdown_race(lines, stopping)) == lines  # before the stop: every error shows
    stopping.set()
    assert list(without_shutdown_race(lines, stopping)) == info + other + single + info


def test_the_instance_storage_is_created_once_before_its_openers_start_together(tmp_path):
    """On a new Dagster home, processes that first open the instance at once can each stamp a schema version
    (two rows in one file's alembic_version, and every later open fails). `make dev` creates the storage
    first; then three openers at once leave each file one stamp."""
    import os
    import shutil
    import sqlite3
    import subprocess
    import sys

    from tests.support.browser import REPO

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    subprocess.run(
        [sys.executable, "-c", "from em_platform.dev import create_instance_storage as c; c()"],
        env=env,
        check=True,
    )
    files = sorted(p.relative_to(home).as_posix() for p in home.rglob("*.db"))
    assert files == ["history/runs.db", "history/runs/index.db", "schedules/schedules.db"]
    opener = "import dagster as dg\nwith dg.DagsterInstance.get() as i: i.get_run_records(limit=1)"
    openers = [subprocess.Popen([sys.executable, "-c", opener], env=env) for _ in range(3)]
    assert [p.wait(timeout=120) for p in openers] == [0, 0, 0]
    for name in files:
        with sqlite3.connect(home / name) as db:
            assert db.execute("select count(*) from alembic_version").fetchone() == (1,), name
