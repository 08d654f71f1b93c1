"""``simulation_sensor``: each spec in EM_SIMULATIONS becomes ``num_stacks`` partitions of ``simulations``
and a run per stack.

The cursor maps spec file → sha1 of its bytes when last requested: an unchanged spec is never requested
again, an edited one is (new run keys), a bad one is reported by name and skipped until it changes, and
a file still being written (modified in the last few seconds) waits for a later tick. A spec that is a
symlink out of the folder, or whose stack names are not safe partition keys (:mod:`em_platform.edge`), is
a bad spec: refused, reported by name, never simulated.
"""

import json
import time

import dagster as dg

from em_platform.edge import Refused, check_file_name
from em_platform.jobs import simulation_job
from em_platform.partitions import simulations
from em_platform.resources import SimulationSpecsResource
from em_platform.settings import sensor_interval_seconds
from em_platform.simulation.cryoet.specs import scan_specs

SETTLE_SECONDS = 2.0
MAX_REQUESTS_PER_TICK = 500


@dg.sensor(
    job=simulation_job,
    minimum_interval_seconds=sensor_interval_seconds(30),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches EM_SIMULATIONS; a new or edited spec of num_stacks N becomes N simulation runs.",
)
def simulation_sensor(
    context: dg.SensorEvaluationContext, simulation_specs: SimulationSpecsResource
) -> dg.SensorResult:
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    now = time.time()
    entries = scan_specs(simulation_specs.folder)
    cursor = {k: v for k, v in seen.items() if k in {e.path.name for e in entries}}
    assert simulations.name is not None  # partitions.py names it
    known = set(context.instance.get_dynamic_partitions(simulations.name))
    requests: list[dg.RunRequest] = []
    new_keys: list[str] = []
    bad: list[str | None] = []  # why each bad spec is bad
    for e in entries:
        if cursor.get(e.path.name) == e.fingerprint or now - e.mtime < SETTLE_SECONDS:
            continue
        if e.spec is None:
            bad.append(e.error)
            context.log.error(f"simulation spec skipped until it is fixed: {e.error}")
            cursor[e.path.name] = e.fingerprint
            continue
        try:
            keys = [check_file_name(k, "partition_key") for k in e.spec.stack_names()]
        except Refused as exc:
            bad.append(f"{e.path}: {exc}")
            context.log.error(f"simulation spec skipped until it is fixed: {e.path}: {exc}")
            cursor[e.path.name] = e.fingerprint
            continue
        if len(requests) + len(keys) > MAX_REQUESTS_PER_TICK and requests:
            break
        new_keys += [k for k in keys if k not in known]
        requests += [
            dg.RunRequest(
                partition_key=k,
                run_key=f"{k}@{e.fingerprint}",
                tags={"em/simulation_spec": str(e.path), "em/simulation_spec_sha1": e.fingerprint},
            )
            for k in keys
        ]
        cursor[e.path.name] = e.fingerprint
    new_cursor = json.dumps(cursor, sort_keys=True)
    if not requests:
        reason = f"{len(bad)} bad spec(s): {bad[0]}" if bad else "no new or changed simulation spec"
        return dg.SensorResult(skip_reason=dg.SkipReason(reason), cursor=new_cursor)
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[simulations.build_add_request(new_keys)] if new_keys else [],
        cursor=new_cursor,
    )
