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
