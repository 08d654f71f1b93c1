"""``cryo_sensor``: every settled tilt series in EM_CRYO_SESSIONS or in the simulator's published root becomes a
partition of ``cryo_tilt_series`` and a run of ``cryo_job``. A single-particle movie set is not requested:
`em-platform cryo-live` processes each of its exposures as it lands (em_platform.cryo.live_sessions); one
can still be processed as a whole by adding its key and launching ``cryo_job`` on it.

The cursor maps partition key → fingerprint (sizes and times of the mdoc, stack and movies), so an unchanged
series is never requested twice and one that grew (more tilts written by the microscope) is requested again.
A series whose files changed within the settle period is still being acquired and waits. Series without
ground truth run without ``simulation/evaluation``. A session folder is an edge, under the inbox's rule: a
folder or a file of a series that resolves outside its root (a symlink pointing out) is never requested: it is
logged in the tick and dead-lettered once (again only if its refusal changes), as the inbox sensor does: the
loop is :mod:`em_platform.sensors.settle`'s.
"""

import time
from pathlib import Path

import dagster as dg

from em_platform.assets.cryo import EVALUATION, K
from em_platform.cryo.frame_sets import FrameSetWatch
from em_platform.cryo.session import RefusedEntry, TiltSeries, fingerprint, newest_change, scan_sessions
from em_platform.edge import Refused, check_relative_key
from em_platform.jobs import cryo_job
from em_platform.partitions import cryo_tilt_series
from em_platform.resources import CatalogResource, CryoSessionsResource
from em_platform.sensors.settle import WatchedEntry, settle_entries
from em_platform.settings import sensor_interval_seconds

MAX_REQUESTS_PER_TICK = 200
# each session root's mdocs as the last tick left them (the code server evaluates every tick): a tick lists
# again only the folders that changed and reads only the mdocs that landed since
_WATCHES: dict[tuple[str, Path], FrameSetWatch] = {}
PROCESSING = list(K.values())


def session_run_config(ts) -> dict:
    """The session's em_session.yaml settings as the run's config, so the run shows (and a re-run from
    the UI keeps) what the operator set; a backfill reads the same file through the session."""
    if not ts.thickness_nm:
        return {}
    return {"ops": {K["tomogram"].to_python_identifier(): {"config": {"thickness_nm": ts.thickness_nm}}}}


@dg.sensor(
    job=cryo_job,
    minimum_interval_seconds=sensor_interval_seconds(15),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches EM_CRYO_SESSIONS and <data root>/simulation; each settled new or grown tilt series "
    "is processed once (and evaluated against its ground truth when it has one).",
)
def cryo_sensor(
    context: dg.SensorEvaluationContext, cryo_sessions: CryoSessionsResource, catalog: CatalogResource
) -> dg.SensorResult:
    now = time.time()
    found: list[TiltSeries] = []
    errors: dict[str, str] = {}
    refused: dict[str, RefusedEntry] = {}
    live: list[Path] = []
    for tag, root in cryo_sessions.roots().items():
        watch = _WATCHES.get((tag, root))
        if watch is None:
            watch = _WATCHES[(tag, root)] = FrameSetWatch(root, tag, aliases=True)
        scan = scan_sessions(root, tag, watch)
        found += scan.found
        errors |= scan.errors
        refused |= scan.refused
        live += scan.movie_set_folders
    for ts in list(found):  # the key names output folders and storage keys: refuse an unsafe one (edge)
        try:
            check_relative_key(ts.key, "partition_key")
        except Refused as exc:
            found.remove(ts)
            errors[ts.key] = str(exc)
    for key, error in errors.items():
        context.log.error(f"cryo session entry {key} skipped: {error}")

    def settled(item: TiltSeries | RefusedEntry) -> bool:
        assert isinstance(item, TiltSeries)  # asked only of entries not refused: the tilt series
        return now - newest_change(item) >= cryo_sessions.settle_seconds

    # the refused first, so that every one is dead-lettered even in a tick that reaches the request limit
    watched: list[WatchedEntry[TiltSeries | RefusedEntry]] = [
        WatchedEntry(key, e.fingerprint, e, refused=True) for key, e in refused.items()
    ]
    watched += [WatchedEntry(ts.key, fingerprint(ts), ts) for ts in found]
    tick = settle_entries(context.cursor, watched, settled=settled, limit=MAX_REQUESTS_PER_TICK)
    for entry in tick.refused:
        assert isinstance(entry.item, RefusedEntry)  # the entries watched with refused=True
        _dead_letter(context, catalog, entry.item)
    assert cryo_tilt_series.name is not None  # partitions.py names it
    known = set(context.instance.get_dynamic_partitions(cryo_tilt_series.name))
    new_keys = [w.key for w in tick.requested if w.key not in known]
    requests = []
    for w in tick.requested:
        series = w.item
        assert isinstance(series, TiltSeries)  # a requested entry is not refused: a tilt series
        requests.append(
            dg.RunRequest(
                partition_key=w.key,
                run_key=f"{w.key}@{w.fingerprint}",
                asset_selection=PROCESSING + ([EVALUATION] if series.truth else []),
                tags={"em/cryo_kind": series.kind, "em/cryo_fingerprint": w.fingerprint},
                run_config=session_run_config(series),
            )
        )
    waiting = tick.waiting
    new_cursor = tick.cursor_json()
    if not requests:
        reason = (
            f"{len(waiting)} tilt series still being written" if waiting else "no new or changed tilt series"
        )
        if live:
            reason += f"; {len(live)} single-particle set(s) processed exposure by exposure by cryo-live"
        if errors:  # a malformed mdoc is not "nothing new": say what was skipped and why
            key, error = next(iter(errors.items()))
            reason = f"{len(errors)} tilt series skipped (first: {key}: {error}); {reason}"
        if refused:
            key, first = next(iter(refused.items()))
            reason = (
                f"{len(refused)} refused (first: {key}: {first.refused}; em-platform dead-letters); {reason}"
            )
        return dg.SensorResult(skip_reason=dg.SkipReason(reason), cursor=new_cursor)
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[cryo_tilt_series.build_add_request(new_keys)] if new_keys else [],
        cursor=new_cursor,
    )


def _dead_letter(context: dg.SensorEvaluationContext, catalog: CatalogResource, entry: RefusedEntry) -> None:
    exc = entry.refused
    assert cryo_tilt_series.name is not None  # partitions.py names it
    letter = catalog.dead_letters().add(
        source="session", topic=cryo_tilt_series.name, field=exc.field, reason=str(exc), body=str(entry.path)
    )
    context.log.error(f"cryo session entry {entry.key!r} not processed, dead-lettered as #{letter}: {exc}")
