"""`em-platform dev` keeps the daemon's log to what happened: sensor ticks that found nothing are left out."""

from em_platform.dev import quiet_lines


def test_quiet_lines_drop_empty_sensor_ticks_only():
    lines = [
        "2026-01-01 - dagster.daemon.SensorDaemon - INFO - Checking for new runs for sensor: montage_sensor\n",
        "2026-01-01 - dagster.daemon.SensorDaemon - INFO - Sensor montage_sensor skipped: no new montage after 3\n",
        "2026-01-01 - dagster.daemon.SensorDaemon - INFO - No run requests returned for inbox_sensor, skipping\n",
        "2026-01-01 - dagster.daemon.SensorDaemon - INFO - Launching run for inbox_sensor\n",
        "2026-01-01 - dagster-webserver - INFO - Serving dagster-webserver on http://127.0.0.1:3000\n",
    ]
    assert list(quiet_lines(lines)) == lines[3:]


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
