"""Montages' runs and events copied on the server from the rows Dagster wrote for the template's real run.

Through Dagster's storage API a montage's run costs 0.2-0.4 s on this 2-core machine (a few statements an
event, 69 events, each its own round trip and serialization), so 10⁴ runs would take the better part of an
hour; copying the template run's rows in SQL costs milliseconds a run. What is copied is what Dagster itself
wrote for one run of ``montage_job``: ``runs`` and ``run_tags``, every ``event_logs`` row, the materializations'
``asset_event_tags``, the ``asset_check_executions``; each renamed (run id, montage id in every text), and
moved back in time (``g / per_day`` days for montage g). Montages from ``real_runs`` on get the
materializations and check evaluations alone, as runless events (``run_id`` empty, job ``__RUNLESS__``: what
``report_runless_asset_event`` writes), without the pictures in their metadata (disk). Partitions are added
through ``add_dynamic_partitions``.

The event bodies keep the template's timestamps (the columns, which Dagster's queries use, are moved), and
a check evaluation's body still names the template's materialization (its row's storage ids are mapped).
"""

from __future__ import annotations

import sqlalchemy as sa

ASSET_EVENTS = ("ASSET_MATERIALIZATION", "ASSET_CHECK_EVALUATION")


class DagsterRows:
    """The template run's rows in Dagster's PostgreSQL storage, copied per montage."""

    def __init__(self, url: str, run_id: str, montage_id: str, *, per_day: float, real_runs: int):
        self.engine = sa.create_engine(url)
        self.params = {"t": run_id, "m": montage_id, "per_day": per_day, "r": real_runs}
        with self.engine.connect() as conn:
            self.events = conn.execute(
                sa.text("SELECT count(*) FROM event_logs WHERE run_id = :t"), self.params
            ).scalar_one()
            self.runless_events = conn.execute(
                sa.text(
                    "SELECT count(*) FROM event_logs WHERE run_id = :t AND dagster_event_type IN :kinds"
                ).bindparams(sa.bindparam("kinds", expanding=True)),
                {**self.params, "kinds": list(ASSET_EVENTS)},
            ).scalar_one()

    def dispose(self) -> None:
        self.engine.dispose()

    def add(self, first: int, last: int) -> dict[str, int]:
        """Montages ``first`` .. ``last`` - 1: runs for those below ``real_runs``, runless events for the rest."""
        rows: dict[str, int] = {}
        with self.engine.begin() as conn:
            real = (first, min(last, self.params["r"]))
            if real[0] < real[1]:
                self._runs(conn, *real, rows)
            runless = (max(first, self.params["r"]), last)
            if runless[0] < runless[1]:
                self._runless(conn, *runless, rows)
            conn.execute(sa.text("SELECT setval('event_logs_id_seq', (SELECT max(id) FROM event_logs))"))
        return rows

    def _runs(self, conn, a: int, b: int, rows: dict[str, int]) -> None:
        p = {**self.params, "a": a, "b": b - 1, "n": self.events}
        p["base"] = conn.execute(sa.text("SELECT max(id) + 1 FROM event_logs")).scalar_one()
        run = "md5('scale-run-' || g)::uuid::text"
        key = "('scale-' || lpad(g::text, 7, '0'))"
        secs = "(g * 86400.0 / :per_day)"
        ago = f"make_interval(secs => {secs})"
        ranked = "(SELECT *, row_number() OVER (ORDER BY id) - 1 AS rk FROM event_logs WHERE run_id = :t)"
        series = "generate_series(:a, :b) g"
        rows["runs"] = conn.execute(sa.text(f"""
            INSERT INTO runs (run_id, snapshot_id, pipeline_name, mode, status, run_body, partition, partition_set,
                              create_timestamp, update_timestamp, start_time, end_time)
            SELECT {run}, snapshot_id, pipeline_name, mode, status,
                   replace(replace(run_body, :t, {run}), :m, {key}), {key}, partition_set,
                   create_timestamp - {ago}, update_timestamp - {ago}, start_time - {secs}, end_time - {secs}
            FROM runs, {series} WHERE run_id = :t"""), p).rowcount  # fmt: skip
        rows["run_tags"] = conn.execute(sa.text(f"""
            INSERT INTO run_tags (run_id, key, value)
            SELECT {run}, key, replace(value, :m, {key}) FROM run_tags, {series} WHERE run_id = :t"""), p).rowcount  # fmt: skip
        rows["event_logs"] = conn.execute(sa.text(f"""
            INSERT INTO event_logs (id, run_id, event, dagster_event_type, timestamp, step_key, asset_key, partition)
            SELECT :base + (g - :a) * :n + e.rk, {run}, replace(replace(e.event, :t, {run}), :m, {key}),
                   e.dagster_event_type, e.timestamp - {ago}, e.step_key, e.asset_key,
                   replace(e.partition, :m, {key})
            FROM {ranked} e, {series}"""), p).rowcount  # fmt: skip
        rows["asset_event_tags"] = conn.execute(sa.text(f"""
            INSERT INTO asset_event_tags (event_id, asset_key, key, value, event_timestamp)
            SELECT :base + (g - :a) * :n + e.rk, t.asset_key, t.key, t.value, t.event_timestamp - {ago}
            FROM asset_event_tags t JOIN {ranked} e ON e.id = t.event_id, {series}"""), p).rowcount  # fmt: skip
        rows["asset_check_executions"] = conn.execute(sa.text(f"""
            INSERT INTO asset_check_executions (asset_key, check_name, partition, run_id, execution_status,
                   evaluation_event, evaluation_event_timestamp, evaluation_event_storage_id,
                   materialization_event_storage_id, create_timestamp)
            SELECT c.asset_key, c.check_name, replace(c.partition, :m, {key}), {run}, c.execution_status,
                   replace(replace(c.evaluation_event, :t, {run}), :m, {key}),
                   c.evaluation_event_timestamp - {ago}, :base + (g - :a) * :n + ev.rk,
                   :base + (g - :a) * :n + mat.rk, c.create_timestamp - {ago}
            FROM asset_check_executions c LEFT JOIN {ranked} ev ON ev.id = c.evaluation_event_storage_id
                 LEFT JOIN {ranked} mat ON mat.id = c.materialization_event_storage_id, {series}
            WHERE c.run_id = :t"""), p).rowcount  # fmt: skip

    def _runless(self, conn, a: int, b: int, rows: dict[str, int]) -> None:
        p = {**self.params, "a": a, "b": b - 1, "n": self.runless_events}
        p["base"] = conn.execute(sa.text("SELECT max(id) + 1 FROM event_logs")).scalar_one()
        key = "('scale-' || lpad(g::text, 7, '0'))"
        ago = "make_interval(secs => g * 86400.0 / :per_day)"
        ranked = (
            "(SELECT *, row_number() OVER (ORDER BY id) - 1 AS rk FROM event_logs WHERE run_id = :t "
            "AND dagster_event_type IN ('ASSET_MATERIALIZATION', 'ASSET_CHECK_EVALUATION'))"
        )
        # the pictures (base64 data URIs) left out: 10⁵ montages of them would not fit this machine's disk; the
        # bytes a montage's events take are measured on the points with runs
        body = (
            "regexp_replace(replace(replace(replace(e.event, :t, ''), :m, {key}), '\"montage_job\"', "
            "'\"__RUNLESS__\"'), 'data:image/[a-z]+;base64,[A-Za-z0-9+/=]+', 'data:image/png;base64,', 'g')"
        )
        series = "generate_series(:a, :b) g"
        rows["runless_event_logs"] = conn.execute(sa.text(f"""
            INSERT INTO event_logs (id, run_id, event, dagster_event_type, timestamp, step_key, asset_key, partition)
            SELECT :base + (g - :a) * :n + e.rk, '', {body.format(key=key)}, e.dagster_event_type,
                   e.timestamp - {ago}, NULL, e.asset_key, replace(e.partition, :m, {key})
            FROM {ranked} e, {series}"""), p).rowcount  # fmt: skip
        conn.execute(sa.text(f"""
            INSERT INTO asset_event_tags (event_id, asset_key, key, value, event_timestamp)
            SELECT :base + (g - :a) * :n + e.rk, t.asset_key, t.key, t.value, t.event_timestamp - {ago}
            FROM asset_event_tags t JOIN {ranked} e ON e.id = t.event_id, {series}"""), p)  # fmt: skip
        rows["runless_checks"] = conn.execute(sa.text(f"""
            INSERT INTO asset_check_executions (asset_key, check_name, partition, run_id, execution_status,
                   evaluation_event, evaluation_event_timestamp, evaluation_event_storage_id,
                   materialization_event_storage_id, create_timestamp)
            SELECT c.asset_key, c.check_name, replace(c.partition, :m, {key}), '', c.execution_status,
                   replace(replace(c.evaluation_event, :t, ''), :m, {key}), c.evaluation_event_timestamp - {ago},
                   :base + (g - :a) * :n + ev.rk, :base + (g - :a) * :n + mat.rk, c.create_timestamp - {ago}
            FROM asset_check_executions c JOIN {ranked} ev ON ev.id = c.evaluation_event_storage_id
                 LEFT JOIN {ranked} mat ON mat.id = c.materialization_event_storage_id, {series}
            WHERE c.run_id = :t"""), p).rowcount  # fmt: skip

    def forget_standins(self, before: float) -> int:
        """What the retention job deletes of a run (``instance.delete_run``: its ``event_logs`` rows and their
        ``asset_event_tags``; :mod:`em_platform.retention.dagster_runs`: its ``asset_check_executions``) for the
        runs the runless rows stand for, where it would have deleted such a run: a montage's runs go when it
        is retired, archived before ``before`` (a Unix time), which every montage the fill made is. By the
        time, not the partition: the montage checks' rows name none. Without this the state after retention
        would hold events no deployment keeps. Returns the events deleted."""
        gone = "SELECT id FROM event_logs WHERE run_id = '' AND timestamp < to_timestamp(:before) AT TIME ZONE 'UTC'"
        with self.engine.begin() as conn:
            for table, column in (
                ("asset_event_tags", "event_id"),
                ("asset_check_executions", "evaluation_event_storage_id"),
            ):
                conn.execute(sa.text(f"DELETE FROM {table} WHERE {column} IN ({gone})"), {"before": before})
            return conn.execute(
                sa.text(f"DELETE FROM event_logs WHERE id IN ({gone})"), {"before": before}
            ).rowcount
