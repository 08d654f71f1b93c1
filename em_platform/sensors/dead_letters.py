"""``dead_letter_sensor``: refused input waiting for an operator shows in the UI as a failing sensor.

Every entry point dead-letters what it refuses (:mod:`em_platform.catalog.dead_letters`). A letter nobody
looks at is as good as lost, so while any is waiting this sensor's ticks fail, in red on the Automation
page and the sensor's tick history, with the count, the newest letters (source, topic, field, reason) and
what to do; the tick turns green once ``em-platform dead-letters --replay``/``--clear`` has dealt with them.
It requests no run.
"""

import dagster as dg

from em_platform.resources import CatalogResource
from em_platform.settings import sensor_interval_seconds

SHOWN = 5


class DeadLettersWaiting(RuntimeError):
    """Refused messages or entries wait for a decision (the tick's failure names them)."""


@dg.sensor(
    minimum_interval_seconds=sensor_interval_seconds(60),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Fails while refused input (bad ids, tiles off the scope shares, inbox symlinks out of the "
    "inbox) waits in the dead letters; `em-platform dead-letters` lists, replays and clears them.",
)
def dead_letter_sensor(context: dg.SensorEvaluationContext, catalog: CatalogResource) -> dg.SkipReason:
    waiting = catalog.dead_letters().letters()
    if not waiting:
        return dg.SkipReason("no dead letters waiting")
    newest = waiting[-SHOWN:]
    for letter in newest:
        context.log.error(letter.line())
    raise DeadLettersWaiting(
        f"{len(waiting)} refused message(s) or entr(y/ies) wait in the dead letters; newest:\n  "
        + "\n  ".join(letter.line() for letter in reversed(newest))
        + "\nList them with `em-platform dead-letters` (--json for bodies), replay broker letters after fixing "
        "the cause (e.g. EM_SCOPE_SHARES) with `em-platform dead-letters --replay ID|all`, or record the "
        "decision with `--clear ID|all`."
    )
