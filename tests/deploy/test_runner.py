"""The runner's process management without starting a topology (issue 22, point 3): `plan` leaves a running
topology's state alone, `down` stops the runner too, `status` tells live from dead, the machine's servers and
the ports come from settings."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from em_platform.deploy.processes import (
    REPO,
    STARTED,
    Machine,
    ProcessTopology,
    TopologyError,
    process_start,
    stable_ports,
    status,
    stop_from_pid_file,
)

RUNNER = "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\nwhile True: time.sleep(0.1)"


def test_plan_leaves_a_running_topologys_state_alone(tmp_path):
    recorded = {"runner": [12345], "webserver": [12346]}
    (tmp_path / "pids.json").write_text(json.dumps(recorded))
    topology = ProcessTopology(tmp_path, name="em_plan_only")
    assert topology.plan()
    topology.stop()  # as atexit does when `plan` exits
    assert json.loads((tmp_path / "pids.json").read_text()) == recorded


def test_down_stops_the_runner_and_status_tells_live_from_dead(tmp_path):
    # a runner started as the Makefile starts it: `.venv/bin/python -m ...`, a relative interpreter path
    # (down once looked for the interpreter's absolute prefix in its command line and left it running)
    python = os.path.relpath(sys.executable, REPO)
    runner = subprocess.Popen([python, "-c", RUNNER], cwd=REPO)  # stops on SIGTERM
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        started = {str(runner.pid): process_start(runner.pid), str(dead.pid): 1}
        recorded = {"runner": [runner.pid], "daemon": [dead.pid], STARTED: started}
        (tmp_path / "pids.json").write_text(json.dumps(recorded))
        (tmp_path / "services.json").write_text(
            json.dumps(
                {
                    "webserver": {"address": "127.0.0.1:3000", "pids": [runner.pid]},
                    "daemon": {"address": None, "pids": [dead.pid]},
                }
            )
        )
        assert [(name, alive) for name, _, _, alive in status(tmp_path)] == [
            ("webserver", True),
            ("daemon", False),
        ]
        stop_from_pid_file(tmp_path)
        assert runner.wait(timeout=10) in (0, -signal.SIGTERM)  # it got SIGTERM and ended
        assert not (tmp_path / "pids.json").exists() and status(tmp_path) == []
    finally:
        if runner.poll() is None:
            runner.kill()


def test_down_leaves_a_process_that_took_a_recorded_pid_alone(tmp_path):
    """The system reuses PIDs: a recorded PID whose process started at another time is not the runner's."""
    other = subprocess.Popen([sys.executable, "-c", RUNNER])
    try:
        recorded = {"runner": [other.pid], STARTED: {str(other.pid): process_start(other.pid) - 1}}
        (tmp_path / "pids.json").write_text(json.dumps(recorded))
        stop_from_pid_file(tmp_path)
        assert other.poll() is None  # not signalled
    finally:
        other.kill()
        other.wait()


def test_machine_servers_come_from_settings():
    m = Machine.from_env({"PGHOST": "db.lan", "PGPORT": "5433", "PGUSER": "em", "EM_BROKER": "mq.lan:61614"})
    assert (m.pg_host, m.pg_port, m.pg_user, m.stomp_host, m.stomp_port) == (
        "db.lan",
        5433,
        "em",
        "mq.lan",
        61614,
    )
    assert Machine.from_env({}) == Machine()
    with pytest.raises(TopologyError, match="EM_BROKER"):
        Machine.from_env({"EM_BROKER": "no-port"})


def test_stable_ports_come_from_settings_and_a_taken_one_is_named():
    assert stable_ports({}, check_free=False)["webserver"] == 3000
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(TopologyError, match=f"port {port} .*EM_WEB_PORT"):
            stable_ports({"EM_WEB_PORT": str(port), "EM_CODE_SERVER_PORT": "1", "EM_DASK_SCHEDULER_PORT": "2",
                          "EM_S3_PORT": "3"})  # fmt: skip
    with pytest.raises(TopologyError, match="EM_S3_PORT"):
        stable_ports({"EM_S3_PORT": "s3"}, check_free=False)
    topology = ProcessTopology("/tmp/unused-state", ports={"webserver": 3999})
    assert topology.addresses.ports["webserver"] == 3999


def test_a_service_gets_sigint_back_when_the_runner_runs_as_a_background_job():
    """`make deploy-local &` (or nohup) leaves SIGINT ignored, children inherit it, and Dagster's code server
    maps SIGTERM onto SIGINT's handler: it ignored SIGTERM and every stop waited the 20 s grace."""
    from em_platform.deploy import processes

    code = "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as the shell starts a background job
    try:
        as_inherited = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        as_a_service = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            preexec_fn=processes.service_child,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert as_inherited.stdout.strip() == "True"  # the premise: ignored SIGINT is inherited
    assert as_a_service.stdout.strip() == "False"
