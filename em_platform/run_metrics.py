"""``em_runs_total{job,status}``: Dagster's runs as they end, counted from its run storage by the facility's
exporter (Dagster's open-source webserver has no metrics endpoint: dagster issue 4480).

A counter, not a count of the runs stored: retention deletes old runs, and a count that fell would read as a
counter reset and a burst of failures. Counting starts when the exporter starts (a restart is a reset, which
Prometheus's ``increase`` handles); each job's series start at 0 as soon as a run of it is seen, so that its
first failure is an increase, not a series appearing at 1."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import dagster as dg
from prometheus_client.core import CounterMetricFamily, Metric

from em_platform.sql import aware

ENDED = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
SEEN_RUNS_KEPT = timedelta(days=1)  # a run updated again after it ended (tags) is not counted twice within it


class RunCounts:
    """A Prometheus collector over ``instance``'s runs; each scrape reads the runs changed since the last."""

    def __init__(self, instance: dg.DagsterInstance, now: datetime | None = None):
        self.instance = instance
        self.cursor = now or datetime.now(UTC)
        self.counts: dict[tuple[str, str], int] = {}
        self.counted: dict[str, datetime] = {}  # run id -> when it ended

        for record in instance.get_run_records(limit=500):  # the jobs run lately: their series from 0 at once
            self._job(record.dagster_run.job_name)
            if record.dagster_run.status in ENDED:  # ended before counting started: not counted
                self.counted[record.dagster_run.run_id] = record.update_timestamp

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        self._read()
        family = CounterMetricFamily(
            "em_runs", "Dagster runs that ended, by job and status", labels=["job", "status"]
        )
        for (job, status), n in sorted(self.counts.items()):
            family.add_metric([job, status], n)
        yield family

    def _job(self, job: str) -> None:
        for status in ENDED:
            self.counts.setdefault((job, status.value), 0)

    def _read(self) -> None:
        records = self.instance.get_run_records(
            filters=dg.RunsFilter(updated_after=self.cursor - timedelta(seconds=1)),
            order_by="update_timestamp",
            ascending=True,
        )
        for record in records:
            run = record.dagster_run
            self._job(run.job_name)
            ended = run.status in ENDED
            if ended and run.run_id not in self.counted:
                self.counted[run.run_id] = record.update_timestamp
                self.counts[(run.job_name, run.status.value)] += 1
            self.cursor = max(self.cursor, aware(record.update_timestamp))
        oldest = self.cursor - SEEN_RUNS_KEPT
        self.counted = {r: at for r, at in self.counted.items() if aware(at) >= oldest}
