"""Runs started from the command line the way the daemon starts them: through the code location.

A run made by ``execute_in_process`` carries no code-location origin, so the web UI's job pages, timeline
and filters do not list it. :class:`CodeLocationRuns` loads the code location under the name workspace.yaml
gives it, creates each run from the location's remote job (origin and repository tags exactly as the sensor
daemon sets them, so the daemon's run-key checks see it too) and launches it through the instance. The
instance's launcher is swapped for Dagster's synchronous in-memory one: the run executes in this process,
so a demo pays no new Python process (and no re-import of the code location) per run; its events, logs and
tracebacks go to the instance, where the UI shows them.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

import dagster as dg
from dagster._core.events import DagsterEventType
from dagster._core.instance.ref import InstanceRef
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.storage.tags import PARTITION_NAME_TAG
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget

LOCATION = "em_platform"  # the location name workspace.yaml gives the code location
REPOSITORY = "__repository__"  # a Definitions object's repository name
MODULE = "em_platform.definitions"
IN_PROCESS_LAUNCHER = {
    "module": "dagster._core.launcher.sync_in_memory_run_launcher",
    "class": "SyncInMemoryRunLauncher",
}
# The run's console log only above warnings: the whole log is on the run's page in the UI.
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


class CodeLocationRuns:
    """A context manager: the instance in ``dagster_home`` and the code location, to launch runs through."""

    def __init__(self, dagster_home: str | Path):
        ref = InstanceRef.from_dir(str(dagster_home), overrides={"run_launcher": IN_PROCESS_LAUNCHER})
        self.instance = dg.DagsterInstance.from_ref(ref)
        self._context: WorkspaceProcessContext | None = None

    def __enter__(self) -> CodeLocationRuns:
        origin = InProcessCodeLocationOrigin(
            LoadableTargetOrigin(
                executable_path=sys.executable, module_name=MODULE, working_directory=os.getcwd()
            ),
            location_name=LOCATION,
        )
        self._context = WorkspaceProcessContext(self.instance, InProcessWorkspaceLoadTarget(origin))
        return self

    def __exit__(self, *exc) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None
        self.instance.dispose()

    def launch(
        self,
        job_name: str,
        *,
        partition_key: str | None = None,
        tags: Mapping[str, str] | None = None,
        run_config: Mapping | None = None,
    ) -> str:
        """Create the run as the sensor daemon does (remote origin, job tags, partition) and launch it."""
        assert self._context is not None, "use CodeLocationRuns as a context manager"
        workspace = self._context.create_request_context()
        location = workspace.get_code_location(LOCATION)
        remote_job = location.get_repository(REPOSITORY).get_full_job(job_name)
        config = dict(run_config or QUIET)
        plan = location.get_execution_plan(remote_job, config, step_keys_to_execute=None, known_state=None)
        run_tags = {**(remote_job.run_tags or {}), **(tags or {})}
        if partition_key is not None:
            run_tags[PARTITION_NAME_TAG] = partition_key
        run = self.instance.create_run(
            job_name=job_name,
            run_id=str(uuid.uuid4()),
            run_config=config,
            resolved_op_selection=None,
            step_keys_to_execute=None,
            status=dg.DagsterRunStatus.NOT_STARTED,
            op_selection=None,
            root_run_id=None,
            parent_run_id=None,
            tags=run_tags,
            job_snapshot=remote_job.job_snapshot,
            execution_plan_snapshot=plan.execution_plan_snapshot,
            parent_job_snapshot=remote_job.parent_job_snapshot,
            remote_job_origin=remote_job.get_remote_origin(),
            job_code_origin=remote_job.get_python_origin(),
            asset_selection=None,
            asset_check_selection=None,
            asset_graph=location.get_repository(REPOSITORY).asset_graph,
        )
        self.instance.launch_run(run.run_id, workspace)
        return run.run_id

    def run(self, job_name: str, **kwargs) -> dg.DagsterRun:
        """Launch and execute (synchronously) one run; its final record."""
        run = self.instance.get_run_by_id(self.launch(job_name, **kwargs))
        assert run is not None  # launch() stored it on this instance
        return run


def failure_reason(instance: dg.DagsterInstance, run_id: str) -> str:
    """One line: why the run failed (the first failed step's error, without its traceback)."""
    for record in instance.get_records_for_run(
        run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE}
    ).records:
        event = record.event_log_entry.dagster_event
        assert event is not None  # a record of a Dagster event type carries its event
        error = getattr(event.event_specific_data, "error", None)
        if error is not None:
            return one_line(_innermost(error).message)
        if event.message:
            return one_line(event.message)
    return "failed (see the run in the UI)"


def _innermost(error):
    """The user's own exception: Dagster wraps it ("Error occurred while executing op ...") as the cause."""
    while getattr(error, "cause", None) is not None and "Error occurred while" in error.message:
        error = error.cause
    return error


def one_line(message: str, limit: int = 160) -> str:
    """A message on one line: class prefixes of Dagster's wrappers dropped, whitespace folded, shortened."""
    text = " ".join(message.split())
    for prefix in ("dagster._core.definitions.events.Failure: ", "dagster._core.errors."):
        text = text.removeprefix(prefix)
    return text if len(text) <= limit else text[: limit - 1] + "…"
