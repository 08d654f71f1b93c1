"""Recovery sensors: a run that failed or was cancelled, however it ended, leaves no record in flight.

A run that raises marks its own record failed. A run whose process died (``kill -9``, out of memory, a
lost container) cannot: the code server (or the run monitor) marks the *run* failed, and these sensors
then mark every catalog record and cryo tilt series the run still held (``pending``/``processing``/
``saving-data``, last changed by that run) failed with the run's failure reason, or cancelled. The retry
policy (``run_retries`` in dagster.yaml) then re-runs it; the retry takes the record back to processing.
The run monitor frees the pool slots a dead run held (``free_slots_after_run_end_seconds``).
"""

from __future__ import annotations

import dagster as dg
from dagster._core.events import DagsterEventType

from em_platform.catalog.status import Status
from em_platform.cryo.results_db import CryoResults
from em_platform.resources import CatalogResource
from em_platform.settings import sensor_interval_seconds

# what the code server / run monitor say about a run worker that vanished
_CRASH_WORDS = ("exited", "exit code", "terminated", "killed", "signal", "run worker", "lost")


def failure_reason(context: dg.RunStatusSensorContext) -> str:
    """Why the run ended: its failed step's error, else the crash the engine reported, else the run's
    failure message."""
    run = context.dagster_run
    steps = context.get_step_failure_events() if isinstance(context, dg.RunFailureSensorContext) else []
    for event in reversed(steps):
        error = getattr(event.event_specific_data, "error", None)
        if error is not None:
            return f"run {run.run_id} failed in {event.step_key}: {error.message.strip()}"
    records = context.instance.get_records_for_run(
        run.run_id, of_type=DagsterEventType.ENGINE_EVENT, ascending=False, limit=50
    ).records
    for record in records:
        message = record.event_log_entry.message or ""
        if any(word in message.lower() for word in _CRASH_WORDS):
            return f"run {run.run_id} failed: {message.strip()}"
    said = context.dagster_event.message if context.dagster_event else None
    return f"run {run.run_id} {run.status.value.lower()}: {said or 'no reason given'}"


def _release(context: dg.RunStatusSensorContext, catalog: CatalogResource, status: Status) -> None:
    run_id = context.dagster_run.run_id
    reason = failure_reason(context)
    records = catalog.db().release_run(run_id, reason, status=status)
    results = CryoResults(catalog.url)
    try:
        series = results.release_run(run_id, reason)  # cryo knows processing / complete / failed
    finally:
        results.dispose()
    held = [f"{r['source']}/{r['source_id']}" for r in records] + [f"cryo/{k}" for k in series]
    if held:
        context.log.warning(
            f"{len(held)} record(s) left in flight by run {run_id} -> {status.value}: "
            f"{', '.join(held[:20])}; {reason}"
        )


@dg.run_failure_sensor(
    name="failed_run_records",
    minimum_interval_seconds=sensor_interval_seconds(10),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A failed run (a crash included) leaves no catalog record or cryo tilt series 'processing': "
    "they go to 'failed' with the run's failure reason, and the run retry takes them up again.",
)
def failed_run_records(context: dg.RunFailureSensorContext, catalog: CatalogResource) -> None:
    _release(context, catalog, Status.FAILED)


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.CANCELED,
    name="cancelled_run_records",
    minimum_interval_seconds=sensor_interval_seconds(10),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A cancelled run leaves no catalog record or cryo tilt series 'processing': they go to "
    "'cancelled' (cryo: 'failed') with the reason.",
)
def cancelled_run_records(context: dg.RunStatusSensorContext, catalog: CatalogResource) -> None:
    _release(context, catalog, Status.CANCELLED)


recovery_sensors = [failed_run_records, cancelled_run_records]
