"""The compose webserver has no Docker socket: Terminate in the UI marks the run CANCELING and the run's own
process (started as the Docker launcher starts it, `dagster api execute_run`) interrupts itself."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import yaml
from dagster._core.definitions.reconstruct import ReconstructableJob
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import serialize_value

from em_platform.deploy import dagster_instance
from em_platform.deploy.dagster_instance import FacilityInstance, SelfCancellingDockerRunLauncher
from tests.support.polling import wait_until

ROOT = Path(__file__).resolve().parents[2]

JOB = """
import time
import dagster as dg

@dg.op
def long_fusion(context):
    while True:  # a step that only a cancellation ends
        time.sleep(0.2)

@dg.job
def long_job():
    long_fusion()
"""


def test_a_run_marked_canceling_stops_itself_without_a_docker_socket(tmp_path, monkeypatch):
    monkeypatch.setattr(dagster_instance, "DOCKER_SOCKET", str(tmp_path / "no-docker.sock"))
    (tmp_path / "jobs.py").write_text(JOB)
    overrides = {
        "instance_class": {
            "module": "em_platform.deploy.dagster_instance",
            "class": "FacilityInstance",
        },
        "run_monitoring": {"cancellation_thread_poll_interval_seconds": 1},
    }
    with dg.instance_for_test(overrides=overrides) as instance:
        assert isinstance(instance, FacilityInstance)
        recon = ReconstructableJob.for_file(str(tmp_path / "jobs.py"), "long_job")
        run = instance.create_run_for_job(recon.get_definition(), job_code_origin=recon.get_python_origin())
        args = ExecuteRunArgs(
            job_origin=recon.get_python_origin(), run_id=run.run_id, instance_ref=instance.get_ref()
        )
        worker = subprocess.Popen(
            [sys.executable, "-m", "dagster", "api", "execute_run", serialize_value(args)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(
                lambda: instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED,
                60,
                "the run to start",
            )
            launcher = SelfCancellingDockerRunLauncher()
            launcher.register_instance(instance)
            assert launcher.terminate(run.run_id)  # what the UI's Terminate calls, with no socket to reach
            worker.wait(timeout=60)
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.CANCELED
            assert not launcher.terminate(run.run_id)  # a finished run is not terminated again
        finally:
            if worker.poll() is None:
                worker.kill()
            out = worker.communicate()[0].decode(errors="replace")
        assert "sending interrupt" in out, out[-2000:]


def test_the_compose_instance_cancels_by_status_and_the_webserver_has_no_socket():
    config = yaml.safe_load((ROOT / "docker" / "dagster.yaml").read_text())
    assert config["instance_class"] == {
        "module": "em_platform.deploy.dagster_instance",
        "class": "FacilityInstance",
    }
    assert config["run_launcher"]["class"] == "SelfCancellingDockerRunLauncher"
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    web = compose["services"]["webserver"]
    assert not any("docker.sock" in v for v in web.get("volumes", []))
    assert any("docker.sock" in v for v in compose["services"]["daemon"]["volumes"])  # it launches runs


def test_a_daemon_silent_for_two_minutes_is_reported_dead():
    from dagster._daemon.types import DaemonHeartbeat

    overrides = {
        "instance_class": {"module": "em_platform.deploy.dagster_instance", "class": "FacilityInstance"}
    }
    with dg.instance_for_test(overrides=overrides) as instance, dg.instance_for_test() as stock:
        for inst in (instance, stock):
            for daemon in inst.get_required_daemon_types():
                inst.add_daemon_heartbeat(DaemonHeartbeat(time.time() - 120, daemon, "killed", None))
        assert not any(s.healthy for s in instance.get_daemon_statuses().values())
        assert all(s.healthy for s in stock.get_daemon_statuses().values())  # Dagster's own: 30 minutes
        for daemon in instance.get_required_daemon_types():
            instance.add_daemon_heartbeat(DaemonHeartbeat(time.time(), daemon, "alive", None))
        assert all(s.healthy for s in instance.get_daemon_statuses().values())
